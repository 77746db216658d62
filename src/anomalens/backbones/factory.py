"""One entry point that builds a detector's backbone from a name: :func:`build_backbone`.

``create_detector`` builds the backbone here once and passes the built object to the detector
(as segment-anything builds its image encoder and hands it to ``Sam``). The weights are named
``weights`` for both kinds; for CLIP they are what open_clip calls ``pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, overload

import torch

from anomalens.backbones.clip_backbone import ClipBackbone
from anomalens.backbones.clip_build import build_clip_backbone
from anomalens.backbones.clip_presets import get_clip_preset
from anomalens.backbones.cnn import RANDOM_WEIGHTS, CNNFeatureExtractor, cnn_extractor
from anomalens.backbones.precision import Precision, precision_dtype

__all__ = ["BACKBONE_KINDS", "BackboneKind", "build_backbone"]

BackboneKind = Literal["cnn", "clip"]
BACKBONE_KINDS: tuple[str, ...] = ("cnn", "clip")


@overload
def build_backbone(
    kind: Literal["cnn"],
    name: str | CNNFeatureExtractor,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    precision: Precision | None = None,
    tf_padding: bool | None = None,
    image_size: int | None = None,
    layers: Sequence[str] | None = None,
) -> CNNFeatureExtractor: ...


@overload
def build_backbone(
    kind: Literal["clip"],
    name: str | ClipBackbone,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    precision: Precision | None = None,
    tf_padding: bool | None = None,
    image_size: int | None = None,
    layers: Sequence[str] | None = None,
) -> ClipBackbone: ...


def build_backbone(
    kind: BackboneKind,
    name: str | CNNFeatureExtractor | ClipBackbone,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    precision: Precision | None = None,
    tf_padding: bool | None = None,
    image_size: int | None = None,
    layers: Sequence[str] | None = None,
) -> CNNFeatureExtractor | ClipBackbone:
    """Build a frozen backbone of ``kind`` from a preset name (or take a built one).

    Args:
        kind: ``"cnn"`` (a :class:`CNNFeatureExtractor`, via ``cnn_extractor``; it satisfies
            :class:`~anomalens.backbones.protocol.PatchFeatureExtractor`) or ``"clip"`` (a
            :class:`ClipBackbone`, via ``build_clip_backbone``).
        name: CNN preset (``anomalens.backbones.presets``) or CLIP preset
            (``anomalens.backbones.clip_presets``) name, or an already built backbone of that
            kind, which is moved to ``device`` and otherwise used as built.
        weights: the backbone's weights. None: the preset's own. ``"random"``: seeded random
            initialisation (tests and smoke runs only). CNN: a file, URL, ``hf-hub:`` id,
            catalogue name or torchvision enum name (``"IMAGENET1K_V1"``). CLIP: an open_clip
            pretrained tag (``"openai"``) or a file, ``hf-hub:`` id, URL or catalogue name.
        device: where the backbone runs.
        precision: CLIP only: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (None: fp32, or a built
            backbone's own). CNNs run in float32 (None or ``"fp32"``).
        tf_padding: CNN only: TensorFlow "SAME" padding (None: the preset's).
        image_size: CLIP only: input side S overriding the preset's (a CNN takes the size of
            each batch it is given).
        layers: CNN only: feature layers (module names; None: the preset's). CLIP taps are the
            detector's choice.

    Returns:
        The built backbone.

    Raises:
        ValueError: unknown ``kind``, an option that does not apply to ``kind``, or an option
            that would change a built backbone.
        KeyError: unknown preset name (the message lists the presets).
        WeightNotAvailableError: weights not on disk or cached and cannot be fetched.
    """
    if kind not in BACKBONE_KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}. Available: {', '.join(BACKBONE_KINDS)}")
    if precision is not None:
        precision_dtype(precision)  # validates the name
    if kind == "cnn":
        return _build_cnn(name, weights, device, precision, tf_padding, image_size, layers)
    for option, value in (("tf_padding", tf_padding), ("layers", layers)):
        if value is not None:
            raise ValueError(
                f"{option}= applies to CNN backbones, not to the CLIP backbone {_label(name)}"
                + (" (CLIP taps are the detector's layers option)" if option == "layers" else "")
            )
    if isinstance(name, CNNFeatureExtractor):
        raise ValueError(f"kind='clip' was given a CNN extractor ({_label(name)})")
    pretrained = None if weights is None else os.fspath(weights)
    if isinstance(name, str) and pretrained == RANDOM_WEIGHTS:
        preset = get_clip_preset(name).with_overrides(pretrained=None)
        return build_clip_backbone(
            preset, device=device, precision=precision, image_size=image_size
        )[0]
    return build_clip_backbone(
        name, pretrained=pretrained, device=device, precision=precision, image_size=image_size
    )[0]


def _build_cnn(
    name: str | CNNFeatureExtractor | ClipBackbone,
    weights: str | os.PathLike[str] | None,
    device: str | torch.device,
    precision: Precision | None,
    tf_padding: bool | None,
    image_size: int | None,
    layers: Sequence[str] | None,
) -> CNNFeatureExtractor:
    """The CNN branch of :func:`build_backbone`."""
    if precision not in (None, "fp32"):
        raise ValueError(
            f"precision={precision!r} applies to CLIP backbones; the CNN backbone "
            f"{_label(name)} runs in float32"
        )
    if image_size is not None:
        raise ValueError(
            f"image_size= applies to CLIP backbones; the CNN backbone {_label(name)} takes the "
            "size of each batch (set the detector's image_size option instead)"
        )
    if isinstance(name, ClipBackbone):
        raise ValueError(f"kind='cnn' was given a ClipBackbone ({_label(name)})")
    if isinstance(name, CNNFeatureExtractor):
        given = {"weights": weights, "tf_padding": tf_padding, "layers": layers}
        set_ = sorted(k for k, v in given.items() if v is not None)
        if set_:
            raise ValueError(
                f"{', '.join(set_)} cannot change the built CNN extractor {_label(name)}; "
                "build it with them (create_cnn_backbone) or leave them unset"
            )
    return cnn_extractor(name, weights=weights, layers=layers, tf_padding=tf_padding, device=device)


def _label(backbone: object) -> str:
    """A short name of a backbone argument for error messages."""
    if isinstance(backbone, str):
        return repr(backbone)
    if isinstance(backbone, CNNFeatureExtractor):
        return repr(backbone.preset.name)
    if isinstance(backbone, ClipBackbone):
        return repr(backbone.model_name or type(backbone).__name__)
    return type(backbone).__name__
