"""The one contract of a detector's patch-feature source: :class:`PatchFeatureExtractor`.

Every feature source a patch-based detector reads satisfies it: the CNN extractor
(:class:`~anomalens.backbones.cnn.CNNFeatureExtractor`), the adapters of
:mod:`anomalens.backbones.patch_features` (CLIP residual streams, CNN maps as tokens) and any
object a user writes with the three methods::

    x = extractor.preprocess(images, size)   # (B, 3, S, S) normalised, on the CPU
    feats = extractor.extract(x.to(device))  # PatchFeatures: tokens per layer, grids, embedding
    extractor.describe()                     # settings that determine the features

The CLIP detectors that need more than patch tokens (text tower, V-V taps, windows) hold a
:class:`~anomalens.backbones.clip_backbone.ClipBackbone`, which offers ``preprocess`` and
``describe`` with the same meaning and richer ``encode_*`` methods instead of ``extract``.
See ``docs/backbones.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from anomalens.data.io import ImageLike

__all__ = ["PatchFeatureExtractor", "PatchFeatures", "maps_to_patch_features"]


@dataclass
class PatchFeatures:
    """Patch tokens of several layers plus one global embedding per image.

    Attributes:
        tokens: per layer, (B, L_l, C_l) patch tokens without class token, row-major grid.
        grids: per layer, the (h_l, w_l) grid with h_l * w_l = L_l.
        embedding: (B, D) global image embedding (not normalised).
    """

    tokens: list[torch.Tensor]
    grids: list[tuple[int, int]]
    embedding: torch.Tensor


@runtime_checkable
class PatchFeatureExtractor(Protocol):
    """What a patch-based detector needs from a backbone: preprocessing and multi-layer tokens."""

    def preprocess(self, images: Sequence[ImageLike], size: int) -> torch.Tensor:
        """Images -> (B, 3, size, size) normalised tensor on the CPU."""
        ...

    def extract(self, x: torch.Tensor) -> PatchFeatures:
        """(B, 3, S, S) on the extractor's device -> :class:`PatchFeatures`."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings that determine the features (for detector ``config()`` dicts)."""
        ...


def maps_to_patch_features(maps: Sequence[torch.Tensor]) -> PatchFeatures:
    """Feature maps as patch tokens; the embedding is the spatial mean of the last map.

    Args:
        maps: per layer, (B, C_l, h_l, w_l).

    Returns:
        :class:`PatchFeatures` with tokens (B, h_l * w_l, C_l) (row-major), grids (h_l, w_l)
        and embedding (B, C_last).
    """
    if not maps:
        raise ValueError("maps_to_patch_features needs at least one feature map")
    tokens = [m.flatten(2).transpose(1, 2) for m in maps]
    grids = [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]
    return PatchFeatures(tokens, grids, maps[-1].mean(dim=(2, 3)))
