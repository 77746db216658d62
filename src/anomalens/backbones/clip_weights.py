"""CLIP weight sources: an open_clip pretrained tag, or anything ``resolve_weights`` accepts.

:func:`resolve_clip_pretrained` turns ``pretrained=`` into a local file. An open_clip tag
(``"openai"``, ``"laion400m_e31"``...) is first looked up without any network access in the
anomalens cache (catalogue entries and the tag's ``hf-hub:`` id), the Hugging Face cache and
``~/.cache/clip``; offline and absent, it fails naming the model, the tag and the source.
Anything else (local file, ``hf-hub:`` id, URL, catalogue name) goes through
:func:`anomalens.backbones.weights.resolve_weights`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import open_clip

from anomalens.backbones.catalogue import WEIGHTS
from anomalens.backbones.weights import (
    WeightNotAvailableError,
    check_reachable,
    is_offline,
    resolve_weights,
)
from anomalens.backbones.weights import (
    cache_dir as anomalens_cache_dir,
)

__all__ = ["cached_tag_file", "resolve_clip_pretrained"]


def cached_tag_file(tag_cfg: Mapping[str, object], cache_dir: str | None) -> Path | None:
    """Find the file of an open_clip pretrained tag in the local caches without any download.

    Args:
        tag_cfg: ``open_clip.get_pretrained_cfg(model, tag)`` (``hf_hub`` and/or ``url``).
        cache_dir: open_clip / Hugging Face cache folder (None: their defaults).

    Returns:
        The cached file, or None.
    """
    hf_id = str(tag_cfg.get("hf_hub", "") or "")
    if hf_id:
        repo, filename = os.path.split(hf_id)  # "org/repo/" -> ("org/repo", "")
        names = (
            [filename]
            if filename
            else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        for name in names:
            hf_source = f"hf-hub:{repo}/{name}"
            # anomalens cache: catalogue entries of this file, then the plain hf-hub id
            aliases = [w.name for w in WEIGHTS if w.source == hf_source] + [hf_source]
            for alias in aliases:
                try:
                    return resolve_weights(alias, offline=True)
                except WeightNotAvailableError:
                    pass
            try:  # huggingface_hub's own cache
                from huggingface_hub import try_to_load_from_cache

                got = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
                if isinstance(got, str) and os.path.isfile(got):
                    return Path(got)
            except ImportError:
                pass
    url = str(tag_cfg.get("url", "") or "")
    if url:
        root = Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/clip").expanduser()
        target = root / os.path.basename(url)
        if target.is_file():
            return target
    return None


def resolve_clip_pretrained(
    model_name: str, pretrained: str, cache_dir: str | None
) -> tuple[Path, dict[str, object]]:
    """Local file for ``pretrained`` (open_clip tag, path, ``hf-hub:`` id, URL or catalogue name).

    Args:
        model_name: open_clip architecture (tags are per architecture).
        pretrained: the weight source.
        cache_dir: open_clip / Hugging Face cache folder for tags.

    Returns:
        (path, tag config); the tag config is empty when ``pretrained`` is not an open_clip tag.

    Raises:
        WeightNotAvailableError: not on disk / cached, and offline or the download failed.
    """
    tag_cfg: dict[str, object] = dict(open_clip.get_pretrained_cfg(model_name, pretrained) or {})
    if not tag_cfg:
        return resolve_weights(pretrained), tag_cfg
    cached = cached_tag_file(tag_cfg, cache_dir)
    if cached is not None:
        return cached, tag_cfg
    where = str(tag_cfg.get("hf_hub") or tag_cfg.get("url") or "")
    reason = "offline mode is on" if is_offline() else _unreachable(tag_cfg)
    if reason is not None:
        name = _download_name(tag_cfg)
        raise WeightNotAvailableError(
            f"CLIP weights {model_name!r} / pretrained={pretrained!r} ({where}) are not cached "
            f"and {reason}. Looked in the cache folder {anomalens_cache_dir()} (set ANOMALENS_CACHE to "
            f"change it) and the Hugging Face / ~/.cache/clip caches. On a machine with internet "
            f"run `anomalens weights download {name}` and copy the file into the cache folder "
            "here (or `anomalens weights pack` / `anomalens weights unpack`), or pass a local "
            "checkpoint file as the weights."
        )
    try:
        path = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as exc:
        raise WeightNotAvailableError(
            f"downloading open_clip weights {model_name!r} / pretrained={pretrained!r} from "
            f"{where} failed ({exc}); pass a local checkpoint file as pretrained= instead"
        ) from exc
    return Path(path), tag_cfg


def _download_name(tag_cfg: Mapping[str, object]) -> str:
    """What ``anomalens weights download`` takes for a tag: its catalogue name, else its id."""
    hf_id = str(tag_cfg.get("hf_hub", "") or "")
    if hf_id:
        repo, filename = os.path.split(hf_id)
        source = f"hf-hub:{repo}/{filename or 'open_clip_model.safetensors'}"
        names = [w.name for w in WEIGHTS if w.source == source]
        return names[0] if names else source
    return str(tag_cfg.get("url", "") or "")


def _unreachable(tag_cfg: Mapping[str, object]) -> str | None:
    """Why the tag's server cannot be reached now (None: it answered)."""
    if tag_cfg.get("hf_hub"):
        return check_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return check_reachable(str(tag_cfg.get("url", "") or ""))
