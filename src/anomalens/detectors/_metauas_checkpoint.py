"""MetaUAS checkpoints: the official ``metauas-256.ckpt`` / ``metauas-512.ckpt`` layout -> our
modules, and our own safetensors format.

The official file is a plain ``torch.save`` of the model's state dict (820 keys; despite the
extension not a Lightning checkpoint). :func:`checkpoint_filter_fn` renames its keys onto
:class:`~anomalens.detectors._metauas_modules.MetaUASNet`: encoder keys from efficientnet-pytorch
names to timm ``tf_efficientnet_b4`` names, alignment / decoder / head keys to ours. The unused
encoder head (``encoder._conv_head``, ``encoder._bn1``) is dropped. Values are unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from anomalens.backbones.weights import read_checkpoint
from anomalens.detectors._metauas_modules import MetaUASConfig
from anomalens.fileio import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_filter_fn",
    "config_from_metadata",
    "load_metauas_checkpoint",
    "save_metauas_checkpoint",
]

#: ``format`` metadata entry of our safetensors files.
CHECKPOINT_FORMAT = "anomalens.metauas"
#: Blocks per timm stage of tf_efficientnet_b4 (flat official block i -> (stage, index)).
_REPEATS = (2, 4, 4, 6, 6, 8, 2)
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# official block sub-module -> timm, for the depthwise-separable blocks 0-1 and the rest
_DS_NAMES = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_IR_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SCSE = {"cSE.1": "channel_reduce", "cSE.3": "channel_expand", "sSE.0": "spatial"}
_OURS = ("encoder.", "alignment.", "decoder.", "head.")


def _block_index(i: int) -> tuple[int, int]:
    for stage, n in enumerate(_REPEATS):
        if i < n:
            return stage, i
        i -= n
    raise KeyError(f"encoder block {sum(_REPEATS) + i} does not exist in EfficientNet-B4")


def _encoder_key(rest: str) -> str | None:
    """Official key after ``encoder.`` -> timm key (None = the unused head, dropped)."""
    if rest.startswith(("_conv_head.", "_bn1.")):
        return None
    if rest == "_conv_stem.weight":
        return "encoder.conv_stem.weight"
    if rest.startswith("_bn0."):
        return "encoder.bn1." + rest[len("_bn0.") :]
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", rest)
    if m is None:
        raise KeyError(f"unexpected encoder key 'encoder.{rest}'")
    flat, module, param = int(m.group(1)), m.group(2), m.group(3)
    stage, j = _block_index(flat)
    names = _DS_NAMES if flat < _REPEATS[0] else _IR_NAMES
    if module not in names:
        raise KeyError(f"unexpected encoder key 'encoder.{rest}' (block {flat} has no {module})")
    return f"encoder.blocks.{stage}.{j}.{names[module]}.{param}"


def _decoder_key(rest: str) -> str:
    """Official key after ``decoder.blocks.`` -> ours."""
    m = re.fullmatch(r"(\d+)\.conv([12])\.([01])\.(\w+)", rest)
    if m:
        block, conv, part, param = m.groups()
        return f"decoder.blocks.{block}.conv{conv}.{'conv' if part == '0' else 'bn'}.{param}"
    m = re.fullmatch(r"(\d+)\.attention([12])\.attention\.(cSE\.[13]|sSE\.0)\.(weight|bias)", rest)
    if m:
        block, which, conv, param = m.groups()
        attn = "attn_in" if which == "1" else "attn_out"
        return f"decoder.blocks.{block}.{attn}.{_SCSE[conv]}.{param}"
    raise KeyError(f"unexpected decoder key 'decoder.blocks.{rest}'")


def checkpoint_filter_fn(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Official MetaUAS state dict -> state dict of ``MetaUASNet``.

    A state dict already in our layout is returned unchanged (tensors only).

    Raises:
        KeyError: a key this mapping does not know (not a MetaUAS checkpoint, or another
            architecture).
    """
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state_dict):
        odd = sorted(k for k in state_dict if k not in tensors)[:8]
        raise KeyError(f"not a MetaUAS state dict: non-tensor entries {odd}")
    if tensors and all(k.startswith(_OURS) for k in tensors) and "head.weight" in tensors:
        return dict(tensors)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith("encoder."):
            new = _encoder_key(key[len("encoder.") :])
            if new is None:
                continue
        elif key.startswith("decoder.blocks."):
            new = _decoder_key(key[len("decoder.blocks.") :])
        elif m := re.fullmatch(
            r"alignment\.(\d+)\.alignment_layer\.dimensionality_reduction\.(weight|bias)", key
        ):
            new = f"alignment.{m.group(1)}.proj.{m.group(2)}"
        elif key in ("mask_head.weight", "mask_head.bias"):
            new = "head." + key.rsplit(".", 1)[1]
        else:
            raise KeyError(f"unexpected key {key!r}: not an official MetaUAS checkpoint")
        out[new] = value
    return out


def save_metauas_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: MetaUASConfig,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write our network as safetensors, atomically (config in the metadata)."""
    from safetensors.torch import save

    path = Path(path)
    # clone: tensors that share storage (e.g. loaded from a pooled file) cannot be saved as views
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(config.to_dict())}
    metadata.update(dict(extra or {}))
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def load_metauas_checkpoint(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read MetaUAS weights: our safetensors file or an official ``.ckpt`` state dict.

    Pickled files are read with ``torch.load(weights_only=True)``.

    Returns:
        (state dict in our layout, safetensors metadata or {}).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        KeyError / ValueError: the file is not a MetaUAS checkpoint.
    """
    raw, metadata = read_checkpoint(path, "MetaUAS checkpoint")
    try:
        return checkpoint_filter_fn(raw), metadata
    except KeyError as exc:
        raise KeyError(f"{path}: {exc.args[0] if exc.args else exc}") from exc


def config_from_metadata(metadata: Mapping[str, str]) -> dict[str, object]:
    """Architecture settings stored in our safetensors metadata ({} for official files)."""
    if metadata.get("format") != CHECKPOINT_FORMAT or "config" not in metadata:
        return {}
    return dict(json.loads(metadata["config"]))
