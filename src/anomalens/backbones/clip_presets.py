"""CLIP backbone presets as data: architecture, weights, input size and preprocessing.

A preset names everything needed to build a :class:`~anomalens.backbones.clip.ClipBackbone`
the way a method's reference code runs it: the open_clip architecture, the pretrained tag (or
file / ``hf-hub:`` id), the input size (positional embeddings are resized to it), the MLP
activation, and the image preprocessing (mean, std, PIL interpolation of the squash resize).

Build one with ``ClipBackbone.from_preset("adaptclip-vitl14-336@518")``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from anomalens.data.transforms import CLIP_MEAN, CLIP_STD

__all__ = ["CLIP_PRESETS", "ClipPreset", "get_clip_preset", "list_clip_presets"]


@dataclass(frozen=True)
class ClipPreset:
    """One CLIP backbone configuration.

    Attributes:
        name: preset name (``ClipBackbone.from_preset(name)``).
        model_name: open_clip architecture name (``open_clip.list_models()``).
        pretrained: open_clip pretrained tag, local file, ``hf-hub:`` id, catalogue name, or
            None for random weights.
        image_size: input side S in pixels; the positional embedding is resized to S / patch.
        quick_gelu: MLP activation ``x * sigmoid(1.702 x)`` (OpenAI weights) instead of GELU.
        mean: per-channel normalisation mean (RGB, [0, 1] scale).
        std: per-channel normalisation std.
        interpolation: PIL filter of the squash resize to S x S (``"bicubic"`` for CLIP).
        description: one line for listings.
    """

    name: str
    model_name: str
    pretrained: str | None
    image_size: int
    quick_gelu: bool
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    description: str = ""

    def with_overrides(self, **changes: object) -> ClipPreset:
        """Return a copy with some fields replaced (e.g. ``pretrained="/models/vitl.pt"``)."""
        return replace(self, **changes)  # type: ignore[arg-type]


_PRESETS: tuple[ClipPreset, ...] = (
    ClipPreset(
        name="adaptclip-vitl14-336@518",
        model_name="ViT-L-14-336",
        pretrained="openai",
        image_size=518,
        quick_gelu=True,
        description="OpenAI ViT-L/14@336 at 518 px (37x37 grid), QuickGELU; AdaptCLIP/AnomalyCLIP/MuSc default",
    ),
    ClipPreset(
        name="vitl14-336@336",
        model_name="ViT-L-14-336",
        pretrained="openai",
        image_size=336,
        quick_gelu=True,
        description="OpenAI ViT-L/14@336 at its native 336 px (24x24 grid), QuickGELU",
    ),
    ClipPreset(
        name="vitb16plus-240@512",
        model_name="ViT-B-16-plus-240",
        pretrained="laion400m_e31",
        image_size=512,
        quick_gelu=False,
        description="LAION-400M ViT-B/16+ at 512 px (32x32 grid), GELU as trained",
    ),
    ClipPreset(
        name="adaptclip-vitb16plus-240@512",
        model_name="ViT-B-16-plus-240",
        pretrained="laion400m_e31",
        image_size=512,
        quick_gelu=True,
        description="LAION-400M ViT-B/16+ at 512 px with QuickGELU, as AdaptCLIP's own loader runs it",
    ),
    ClipPreset(
        name="winclip-vitb16plus-240@240",
        model_name="ViT-B-16-plus-240",
        pretrained="laion400m_e31",
        image_size=240,
        quick_gelu=False,
        description="LAION-400M ViT-B/16+ at its native 240 px (15x15 grid); WinCLIP default",
    ),
    ClipPreset(
        name="anomalens-tiny-clip@64",
        model_name="anomalens-tiny-clip",
        pretrained=None,
        image_size=64,
        quick_gelu=True,
        description="tiny random CLIP (8x8 grid) for tests and offline smoke runs",
    ),
)

#: All presets by name.
CLIP_PRESETS: dict[str, ClipPreset] = {p.name: p for p in _PRESETS}


def list_clip_presets() -> list[str]:
    """Names of all CLIP presets, sorted."""
    return sorted(CLIP_PRESETS)


def get_clip_preset(name: str) -> ClipPreset:
    """Look a preset up by name.

    Raises:
        KeyError: unknown name; the message lists the available presets.
    """
    try:
        return CLIP_PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown CLIP preset {name!r}. Available: {', '.join(list_clip_presets())}"
        ) from None
