"""Building a detector's CLIP backbone: from a preset name, a preset or a ready backbone.

:func:`build_clip_backbone` is what the CLIP detectors (and
:func:`anomalens.backbones.factory.build_backbone`) call: a name builds the preset at the
requested precision and device, a ready :class:`ClipBackbone` is moved to the device and never
converted (a different precision or input size is an error, not a silent change).
:func:`musc_clip_backbone` re-wraps a CLIP built at its native size with MuSc's bicubic
positional-embedding resize.
"""

from __future__ import annotations

from typing import Any

import torch

from anomalens.backbones.clip_backbone import ClipBackbone
from anomalens.backbones.clip_presets import ClipPreset
from anomalens.backbones.precision import Precision

__all__ = ["build_clip_backbone", "musc_clip_backbone"]


def build_clip_backbone(
    backbone: str | ClipPreset | ClipBackbone,
    *,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: Precision | None = None,
    image_size: int | None = None,
) -> tuple[ClipBackbone, str]:
    """A detector's backbone from a preset name, a preset or a ready ``ClipBackbone``.

    Args:
        backbone: preset name (``clip_presets``), a :class:`ClipPreset`, or an already built
            backbone (moved to ``device``).
        pretrained: weights overriding the preset's (None keeps the preset's).
        device: where the backbone runs.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``; None = fp32 for a preset and the
            backbone's own for a ready one. A ready backbone is not converted: a precision
            different from its own is an error rather than silently ignored.
        image_size: input side S overriding the preset's; for a ready backbone it must equal
            the backbone's own (None: no check).

    Returns:
        (backbone, name to record in results).

    Raises:
        ValueError: ``precision``, ``image_size`` or ``pretrained`` given for a ready backbone
            that differs from (or cannot change) its own.
        TypeError: ``backbone`` is none of the accepted types.
    """
    if isinstance(backbone, ClipBackbone):
        if precision is not None and precision != backbone.precision:
            raise ValueError(
                f"precision={precision!r} differs from the given ClipBackbone's "
                f"{backbone.precision!r}; build the backbone with precision={precision!r} "
                "(ClipBackbone.create / from_preset) or leave precision unset"
            )
        if image_size is not None and int(image_size) != backbone.image_size:
            raise ValueError(
                f"image_size={image_size} differs from the given ClipBackbone's "
                f"{backbone.image_size}; build the backbone at that size or leave image_size unset"
            )
        if pretrained is not None and pretrained != backbone.pretrained:
            raise ValueError(
                f"weights {pretrained!r} cannot be loaded into a ready ClipBackbone (built from "
                f"{backbone.pretrained!r}); build the backbone with them instead"
            )
        return backbone.to(device), backbone.model_name or type(backbone).__name__
    if not isinstance(backbone, (str, ClipPreset)):
        raise TypeError(
            "backbone must be a CLIP preset name, a ClipPreset or a ClipBackbone, got "
            f"{type(backbone).__name__}"
        )
    overrides: dict[str, Any] = {"device": str(device), "precision": precision or "fp32"}
    if pretrained is not None:
        overrides["pretrained"] = pretrained
    if image_size is not None:
        overrides["image_size"] = int(image_size)
    name = backbone if isinstance(backbone, str) else backbone.name
    return ClipBackbone.from_preset(backbone, **overrides), name


def musc_clip_backbone(native: ClipBackbone, image_size: int, **kwargs: Any) -> ClipBackbone:
    """Re-wrap a CLIP built at its *native* size for MuSc at ``image_size``, as the official code.

    The official MuSc code resizes the positional embedding with bicubic interpolation (no
    antialias), where ``ClipBackbone`` defaults to bilinear (the AdaptCLIP convention). The
    wrapped open_clip model is modified in place and re-wrapped with ``pos_embed_mode="bicubic"``
    (its current positional embedding becomes the one every resize starts from).

    Args:
        native: ClipBackbone whose positional embedding is still the pretrained one (built with
            ``image_size=None``).
        image_size: MuSc input side S (multiple of the patch size).
        **kwargs: ``precision`` / ``device`` for ``ClipBackbone.from_open_clip``.

    Returns:
        A ClipBackbone at ``image_size``.
    """
    patch = native.patch_size
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size={image_size} must be a multiple of the patch size {patch}")
    return ClipBackbone.from_open_clip(
        native.model,
        image_size=image_size,
        mean=native.mean,
        std=native.std,
        interpolation=native.interpolation,
        model_name=native.model_name,
        pretrained=native.pretrained,
        pos_embed_mode="bicubic",
        **kwargs,
    )
