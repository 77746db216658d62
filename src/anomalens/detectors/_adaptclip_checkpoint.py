"""AdaptCLIP adapter checkpoints: official ``epoch_15.pth`` layout -> our modules, and our own
safetensors format.

The official checkpoint is ``{"textual_learner": sd, "visual_learner": sd, "pq_learner": sd}``
(or the same flattened to ``"<learner>.<key>"``). :func:`checkpoint_filter_fn` renames its keys
onto :class:`~anomalens.detectors._adaptclip_modules.AdaptCLIPAdapters`; values are unchanged
apart from squeezing the official singleton dimensions and stacking the normal / abnormal
buffers of the textual adapter. Our files are written and read by ``detectors._checkpoint``
(one layout for AdaptCLIP and AnomalyCLIP).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from anomalens.detectors._adaptclip_modules import AdapterConfig
from anomalens.detectors._checkpoint import CheckpointInfo, read_checkpoint_file, save_checkpoint

__all__ = [
    "CHECKPOINT_KIND",
    "checkpoint_filter_fn",
    "config_from_state_dict",
    "load_adapter_checkpoint",
    "save_adapter_checkpoint",
]

#: ``kind`` metadata entry of our adapter files.
CHECKPOINT_KIND = "adaptclip.adapters"
_LEARNERS = ("textual_learner", "visual_learner", "pq_learner")
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# official Sequential indices -> our submodule names
_VA_INDEX = {"0": "fc1", "1": "bn", "3": "fc2"}
_PQ_LOCAL_INDEX = {
    "0": "conv1",
    "1": "bn1",
    "3": "up1",
    "4": "conv2",
    "5": "bn2",
    "7": "up2",
    "8": "classifier",
}
_PQ_GLOBAL_INDEX = {"0": "fc1", "1": "bn1", "3": "fc2", "4": "bn2", "6": "classifier"}


def _split_learners(state_dict: Mapping[str, object]) -> dict[str, dict[str, torch.Tensor]]:
    """Nested ``{learner: sd}`` or flattened ``{"learner.key": t}`` -> nested."""
    nested: dict[str, dict[str, torch.Tensor]] = {name: {} for name in _LEARNERS}
    unknown = []
    for key, value in state_dict.items():
        if key in _LEARNERS and isinstance(value, Mapping):
            nested[key].update(value)
            continue
        learner, _, rest = key.partition(".")
        if learner in _LEARNERS and rest and isinstance(value, torch.Tensor):
            nested[learner][rest] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(
            "not an official AdaptCLIP checkpoint: expected the keys "
            f"{', '.join(_LEARNERS)} (or '<learner>.<key>'), found {sorted(unknown)[:8]}"
        )
    return nested


def _textual(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    needed = [
        f"{p}_{c}"
        for p in ("ctx", "token_prefix", "token_suffix", "tokenized_prompts")
        for c in ("pos", "neg")
    ]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise KeyError(f"textual_learner is missing {missing}")
    extra = sorted(set(sd) - set(needed))
    if extra:
        raise KeyError(f"textual_learner has unexpected keys {extra}")

    def flat(t: torch.Tensor) -> torch.Tensor:  # (1, 1, n, W) -> (n, W)
        return t.reshape(-1, t.shape[-1])

    # 'pos' is the NORMAL prompt, 'neg' the ABNORMAL one (text row 0 = normal)
    return {
        "textual.ctx_normal": flat(sd["ctx_pos"]).float(),
        "textual.ctx_abnormal": flat(sd["ctx_neg"]).float(),
        "textual.token_prefix": torch.stack(
            [flat(sd["token_prefix_pos"]), flat(sd["token_prefix_neg"])]
        ).float(),
        "textual.token_suffix": torch.stack(
            [flat(sd["token_suffix_pos"]), flat(sd["token_suffix_neg"])]
        ).float(),
        "textual.token_ids": torch.stack(
            [sd["tokenized_prompts_pos"].reshape(-1), sd["tokenized_prompts_neg"].reshape(-1)]
        ).long(),
    }


def _remap_indexed(
    sd: dict[str, torch.Tensor], prefix: str, index: dict[str, str], target: str, where: str
) -> dict[str, torch.Tensor]:
    """``prefix.<i>.<param>`` -> ``target.<index[i]>.<param>``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix + "."):
            continue
        idx, _, param = key[len(prefix) + 1 :].partition(".")
        if idx not in index:
            raise KeyError(f"{where}: unexpected key {key!r} (layer index {idx} unknown)")
        out[f"{target}.{index[idx]}.{param}"] = value
    return out


def _visual(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for official, ours in (
        ("global_adapter", "global_adapter"),
        ("local_adater", "local_adapter"),  # sic: the official attribute name
        ("local_adapter", "local_adapter"),
    ):
        out.update(
            _remap_indexed(sd, f"{official}.fc", _VA_INDEX, f"visual.{ours}", "visual_learner")
        )
    known = ("global_adapter.fc.", "local_adater.fc.", "local_adapter.fc.")
    extra = [k for k in sd if not k.startswith(known)]
    if extra:
        raise KeyError(f"visual_learner has unexpected keys {sorted(extra)}")
    return out


def _shared_head(
    sd: dict[str, torch.Tensor], name: str, index: dict[str, str], target: str
) -> dict[str, torch.Tensor]:
    """Official heads are one module saved once per layer; check the copies agree, keep one."""
    copies = sorted({k.split(".")[1] for k in sd if k.startswith(name + ".")}, key=int)
    if not copies:
        raise KeyError(f"pq_learner has no {name}.* keys")
    first = _remap_indexed(sd, f"{name}.{copies[0]}", index, target, "pq_learner")
    for c in copies[1:]:
        other = _remap_indexed(sd, f"{name}.{c}", index, target, "pq_learner")
        if other.keys() != first.keys() or any(not torch.equal(other[k], first[k]) for k in first):
            raise ValueError(
                f"pq_learner.{name}.{c} differs from {name}.{copies[0]}: the official PQA heads are "
                "shared by all layers, but this checkpoint holds different copies"
            )
    return first


def _prompt_query(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("sharebn."):
            _, layer, param = key.split(".", 2)
            if param not in _BN_KEYS:
                raise KeyError(f"pq_learner: unexpected key {key!r}")
            out[f"prompt_query.layer_norms.{layer}.{param}"] = value
        elif not key.startswith(("local_adapter.", "global_adapter.")):
            raise KeyError(f"pq_learner: unexpected key {key!r}")
    out.update(_shared_head(sd, "local_adapter", _PQ_LOCAL_INDEX, "prompt_query.local_head"))
    out.update(_shared_head(sd, "global_adapter", _PQ_GLOBAL_INDEX, "prompt_query.global_head"))
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Official AdaptCLIP checkpoint -> state dict of ``AdaptCLIPAdapters``.

    Accepts the nested layout of ``epoch_15.pth`` (``textual_learner``, ``visual_learner``,
    ``pq_learner``) or the flattened ``"<learner>.<key>"`` one. A state dict already in our layout
    (keys starting with ``textual.``/``visual.``/``prompt_query.``) is returned unchanged.

    Raises:
        KeyError: a learner is missing or holds keys this mapping does not know.
        ValueError: the four copies of a shared PQA head differ.
    """
    keys = list(state_dict)
    if keys and all(k.startswith(("textual.", "visual.", "prompt_query.")) for k in keys):
        return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    nested = _split_learners(state_dict)
    missing = [name for name, sd in nested.items() if not sd]
    if missing:
        raise KeyError(f"official AdaptCLIP checkpoint lacks {missing} (needs {list(_LEARNERS)})")
    out = _textual(nested["textual_learner"])
    out.update(_visual(nested["visual_learner"]))
    out.update(_prompt_query(nested["pq_learner"]))
    return out


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> AdapterConfig:
    """Adapter sizes read from the tensor shapes of a state dict in our layout."""
    try:
        n_ctx, text_width = state_dict["textual.ctx_normal"].shape
        context_length = state_dict["textual.token_ids"].shape[-1]
        hidden, embed_dim = state_dict["visual.global_adapter.fc1.weight"].shape
        mid_dim = state_dict["prompt_query.local_head.conv1.weight"].shape[0]
    except KeyError as exc:
        raise KeyError(f"AdaptCLIP adapter state dict lacks {exc}") from None
    num_layers = len(
        {k.split(".")[2] for k in state_dict if k.startswith("prompt_query.layer_norms.")}
    )
    return AdapterConfig(
        embed_dim=int(embed_dim),
        text_width=int(text_width),
        n_ctx=int(n_ctx),
        context_length=int(context_length),
        reduction=int(embed_dim) // int(hidden),
        mid_dim=int(mid_dim),
        num_layers=num_layers,
    )


def save_adapter_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: AdapterConfig,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write our adapters as safetensors, atomically (layout: ``detectors._checkpoint``)."""
    return save_checkpoint(
        path, state_dict, kind=CHECKPOINT_KIND, config=config.to_dict(), extra=extra
    )


def load_adapter_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read adapters from our safetensors file (any layout), or an official ``.pth``/safetensors.

    Official ``.pth`` files are read with ``torch.load(weights_only=True)``.

    Returns:
        (state dict in our layout, what the file says about itself).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not an AdaptCLIP adapter checkpoint (the message names it).
    """
    return read_checkpoint_file(path, CHECKPOINT_KIND, "AdaptCLIP checkpoint", checkpoint_filter_fn)
