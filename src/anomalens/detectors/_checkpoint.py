"""Checkpoints of the learned parts of the frozen-CLIP detectors: one layout, atomic writes.

AdaptCLIP's adapters and AnomalyCLIP's prompts are written the same way: a safetensors file
(tensors as they are in the module's state dict, on the CPU) whose metadata holds

* ``format``: ``"anomalens"``; ``layout``: ``"2"``;
* ``kind``: what the tensors are (``"adaptclip.adapters"``, ``"anomalyclip.prompts"``);
* ``config``: JSON of the module sizes (also recoverable from the tensor shapes);
* ``extra``: JSON of everything else worth keeping (backbone, source, training settings, epoch).

The file is written to a temporary name in the same folder and renamed, so an interrupted save
leaves the previous file (or none), never a truncated one. :func:`read_checkpoint_file` also reads
the two layouts written before this one (``layout`` "1") and foreign files (the official
``.pth`` checkpoints, through the method's ``checkpoint_filter_fn``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anomalens.backbones.weights import read_checkpoint
from anomalens.fileio import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "LAYOUT_VERSION",
    "CheckpointInfo",
    "parse_metadata",
    "read_checkpoint_file",
    "read_info",
    "save_checkpoint",
]

#: ``format`` metadata value of every checkpoint anomalens writes.
CHECKPOINT_FORMAT = "anomalens"
#: ``layout`` metadata value of the current layout.
LAYOUT_VERSION = "2"

# layout 1, written before the two methods shared this module: format string -> kind
_LEGACY_FORMATS = {
    "anomalens.adaptclip.adapters": "adaptclip.adapters",
    "anomalens-anomalyclip-v1": "anomalyclip.prompts",
}
_LEGACY_ANOMALYCLIP_SIZES = ("text_width", "n_ctx", "depth", "t_n_ctx")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint file says about itself.

    Attributes:
        kind: ``"adaptclip.adapters"`` or ``"anomalyclip.prompts"`` for files anomalens wrote;
            None for a foreign (official) file.
        layout: ``"2"`` (current), ``"1"`` (earlier anomalens files) or None (foreign).
        config: module sizes recorded with the tensors ({} for a foreign file).
        extra: everything else recorded (backbone, source, training settings, epoch).
    """

    kind: str | None = None
    layout: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        """True when anomalens wrote the file (any layout)."""
        return self.kind is not None


def save_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    kind: str,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a state dict as safetensors in the one layout, atomically.

    Args:
        path: the file (its folder is created).
        state_dict: tensors to store (detached, moved to the CPU, made contiguous).
        kind: what the tensors are, e.g. ``"adaptclip.adapters"``.
        config: JSON-serialisable module sizes.
        extra: JSON-serialisable extra facts (values that are not are stored as strings).

    Returns:
        ``path``.
    """
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "layout": LAYOUT_VERSION,
        "kind": kind,
        "config": json.dumps(dict(config), sort_keys=True),
        "extra": json.dumps(dict(extra or {}), sort_keys=True, default=str),
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def parse_metadata(metadata: Mapping[str, str]) -> CheckpointInfo:
    """Read safetensors metadata of any layout anomalens wrote; foreign metadata gives kind None.

    Layout 1 (before the shared layout): AdaptCLIP files had ``format``
    ``"anomalens.adaptclip.adapters"``, ``config`` as JSON and every extra entry as its own
    string; AnomalyCLIP files had ``format`` ``"anomalens-anomalyclip-v1"``, each size as its
    own string and ``extra`` as JSON.

    Raises:
        ValueError: an anomalens file whose ``config`` or ``extra`` is not valid JSON.
    """
    fmt = metadata.get("format")
    try:
        if fmt == CHECKPOINT_FORMAT:
            return CheckpointInfo(
                kind=metadata.get("kind"),
                layout=metadata.get("layout"),
                config=json.loads(metadata.get("config", "{}")),
                extra=json.loads(metadata.get("extra", "{}")),
            )
        if fmt == "anomalens.adaptclip.adapters":
            return CheckpointInfo(
                kind=_LEGACY_FORMATS[fmt],
                layout="1",
                config=json.loads(metadata.get("config", "{}")),
                extra={k: v for k, v in metadata.items() if k not in ("format", "config")},
            )
        if fmt == "anomalens-anomalyclip-v1":
            return CheckpointInfo(
                kind=_LEGACY_FORMATS[fmt],
                layout="1",
                config={k: int(metadata[k]) for k in _LEGACY_ANOMALYCLIP_SIZES if k in metadata},
                extra=json.loads(metadata.get("extra", "{}")),
            )
    except ValueError as exc:  # json.JSONDecodeError and int() both are ValueErrors
        raise ValueError(f"unreadable anomalens checkpoint metadata ({exc})") from exc
    return CheckpointInfo()


def read_info(path: str | Path) -> CheckpointInfo:
    """What a safetensors checkpoint says about itself, without reading its tensors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable anomalens metadata (the message names the file).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
    try:
        return parse_metadata(metadata)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from exc


def read_checkpoint_file(
    path: str | Path,
    kind: str,
    what: str,
    filter_fn: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read one of our files or a foreign one and map its keys onto our module.

    ``.pth`` / ``.pt`` files are read with ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        kind: the kind expected (an anomalens file of another kind is refused).
        what: what the file should hold, for error messages (e.g. "AdaptCLIP checkpoint").
        filter_fn: the method's ``checkpoint_filter_fn`` (official keys -> ours; ours pass).

    Returns:
        (state dict in our layout, :class:`CheckpointInfo`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, of another kind, or not holding the expected tensors; the
            message names the file.
    """
    path = Path(path)
    raw, metadata = read_checkpoint(path, what)
    try:
        info = parse_metadata(metadata)
    except ValueError as exc:
        raise ValueError(f"{what} {path}: {exc}") from exc
    if info.kind is not None and info.kind != kind:
        raise ValueError(f"{path} is an anomalens {info.kind!r} checkpoint, not a {what}")
    try:
        return filter_fn(raw), info
    except (KeyError, ValueError) as exc:
        detail = exc.args[0] if exc.args else exc
        raise ValueError(f"{path} is not a usable {what}: {detail}") from exc
