"""Patch-feature adapters that satisfy :class:`~anomalens.backbones.protocol.PatchFeatureExtractor`.

* :class:`ClipPatchExtractor`: raw residual streams of chosen blocks of a
  :class:`~anomalens.backbones.clip_backbone.ClipBackbone` plus its projected CLS (MuSc's
  features);
* :class:`CnnPatchExtractor`: the maps of a
  :class:`~anomalens.backbones.cnn.CNNFeatureExtractor` as tokens, described the way MuSc records
  them.

Build a ClipBackbone for MuSc's exact features with
:func:`~anomalens.backbones.clip_build.musc_clip_backbone` (bicubic position resize).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from anomalens.backbones.protocol import PatchFeatures, maps_to_patch_features
from anomalens.data.io import ImageLike

if TYPE_CHECKING:
    from anomalens.backbones.clip_backbone import ClipBackbone
    from anomalens.backbones.cnn import CNNFeatureExtractor

__all__ = ["CLIP_DEFAULT_LAYERS", "ClipPatchExtractor", "CnnPatchExtractor"]

#: Feature blocks (1-based) per CLIP depth, as the official MuSc scripts (0-based 5,11,17,23 /
#: 2,5,8,11).
CLIP_DEFAULT_LAYERS: dict[int, tuple[int, ...]] = {24: (6, 12, 18, 24), 12: (3, 6, 9, 12)}


class ClipPatchExtractor:
    """MuSc features from a :class:`ClipBackbone`: raw residual streams + projected CLS.

    Patch tokens are the outputs of the given transformer blocks (1-based; the official config
    ``[5, 11, 17, 23]`` means blocks 6, 12, 18, 24), before ``ln_post`` and without projection,
    class token dropped. The embedding is ``ln_post(CLS after the last block) @ proj``.

    Args:
        backbone: a built ClipBackbone (its input size fixes the grid). For the official
            positional-embedding resize use :func:`musc_clip_backbone`.
        layers: 1-based block numbers (default 6, 12, 18, 24 for 24 blocks; 3, 6, 9, 12 for 12).
        batch_size: images per backbone forward inside one ``extract`` call (None: all).
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        layers: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.backbone = backbone
        depth = backbone.num_layers
        if layers is None:
            if depth not in CLIP_DEFAULT_LAYERS:
                raise ValueError(
                    f"no default MuSc layers for a CLIP with {depth} blocks: pass layers=..."
                )
            layers = CLIP_DEFAULT_LAYERS[depth]
        bad = [b for b in layers if not 1 <= int(b) <= depth]
        if bad:
            raise ValueError(f"MuSc layers {bad} out of range: the CLIP has blocks 1..{depth}")
        self.layers = tuple(int(b) for b in layers)
        self.batch_size = batch_size

    def preprocess(self, images: Sequence[ImageLike], size: int) -> torch.Tensor:
        """CLIP squash-resize + mean/std of the backbone (``size`` must equal its input size).

        Returns:
            (B, 3, S, S) float32 on the CPU.
        """
        if size != self.backbone.image_size:
            raise ValueError(
                f"image_size={size} differs from the CLIP backbone's input size "
                f"{self.backbone.image_size}; build the backbone with image_size={size}"
            )
        return self.backbone.preprocess(images)

    def extract(self, x: torch.Tensor) -> PatchFeatures:
        """(B, 3, S, S) -> raw block outputs (B, N, W) per layer and the (B, D) embedding."""
        out = self.backbone.encode_image_tokens(x, self.layers, batch_size=self.batch_size)
        grid = (int(out.grid_size[0]), int(out.grid_size[1]))
        tokens = [t[:, 1:, :] for t in out.tokens]
        emb = self.backbone.project_tokens(out.final[:, 0], ln_post=True)
        return PatchFeatures(tokens, [grid] * len(tokens), emb)

    def describe(self) -> dict[str, Any]:
        """Backbone settings plus the tapped blocks."""
        info: dict[str, Any] = {"backbone_layers": list(self.layers)}
        info.update(self.backbone.describe())
        return info


class CnnPatchExtractor:
    """MuSc features from a CNN (:func:`anomalens.backbones.cnn.create_cnn_backbone`).

    Each feature map (B, C, h, w) becomes (B, h * w, C) tokens on its own grid (MSM runs per
    layer; the score maps are resized to the finest grid before fusion). The global embedding
    for RsCIN is the spatial mean of the last map (normalised by MuSc). The features are those of
    ``model.extract``; only :meth:`describe` differs (MuSc's record keys).
    """

    def __init__(self, model: CNNFeatureExtractor) -> None:
        self.model = model

    def preprocess(self, images: Sequence[ImageLike], size: int) -> torch.Tensor:
        """Squash-resize and normalise with the CNN preset's mean/std: (B, 3, size, size)."""
        return self.model.preprocess(images, size)

    def extract(self, x: torch.Tensor) -> PatchFeatures:
        """(B, 3, S, S) -> tokens per layer and (B, C_last) pooled embedding."""
        return maps_to_patch_features(self.model(x))

    def describe(self) -> dict[str, Any]:
        """Preset name, feature layers and padding of the CNN."""
        p = self.model.preset
        return {"backbone": p.name, "backbone_layers": list(p.layers), "tf_padding": p.tf_padding}
