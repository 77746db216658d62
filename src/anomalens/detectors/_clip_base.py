"""Shared set-up of the detectors on a frozen, tapped CLIP (AdaptCLIP, AnomalyCLIP)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from anomalens.data.io import ImageLike
from anomalens.detectors.base import Detector

if TYPE_CHECKING:
    from anomalens.backbones.clip import ClipBackbone

__all__ = ["FrozenClipDetector"]


class FrozenClipDetector(Detector):
    """A :class:`Detector` whose image encoder is a frozen CLIP read at a few tapped blocks.

    Subclasses call :meth:`_init_clip` in their constructor, then use :meth:`encode`.
    """

    backbone: ClipBackbone
    backbone_name: str
    precision: str
    batch_size: int
    layers: tuple[int, ...]
    vv_start: int
    global_ln_post: bool

    def _init_clip(
        self,
        backbone: str | ClipBackbone,
        *,
        batch_size: int,
        layers: Sequence[int] | None,
        vv_start: int | None,
        default_layers: Callable[[int], Sequence[int]],
        default_vv_start: Callable[[int], int],
        global_ln_post: bool,
    ) -> None:
        """Build (or take) the backbone, freeze it and validate the taps.

        Args:
            backbone: CLIP preset name or a ready ``ClipBackbone``.
            batch_size: images per forward pass (>= 1).
            layers: 1-indexed tapped blocks (None: ``default_layers(depth)``).
            vv_start: first block of the V-V path (None: ``default_vv_start(depth)``).
            default_layers: the method's default taps for a tower depth.
            default_vv_start: the method's default V-V start for a tower depth.
            global_ln_post: apply ``ln_post`` to the global embedding.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from anomalens.backbones.clip import build_clip_backbone, check_taps

        # a preset name is built with the preset's own weights in fp32;
        # ``create_detector(..., weights=..., precision=...)`` builds other variants
        self.backbone, self.backbone_name = build_clip_backbone(backbone, device=self.device)
        self.backbone.eval().requires_grad_(False)
        # a ready ClipBackbone keeps its own dtype: record what actually runs
        self.precision = str(self.backbone.precision)
        self.batch_size = batch_size
        self.image_size = int(self.backbone.image_size)
        depth = int(self.backbone.num_layers)
        self.layers, self.vv_start = check_taps(
            depth,
            layers or default_layers(depth),
            vv_start if vv_start is not None else default_vv_start(depth),
        )
        self.global_ln_post = global_ln_post

    def encode(self, images: Sequence[ImageLike] | torch.Tensor) -> Any:
        """Preprocess (unless given a (B, 3, S, S) tensor) and run the frozen image encoder.

        Returns:
            ``ClipImageFeatures``: ``patch_tokens`` per tapped layer (B, 1+N, D), the V-V
            stream, and ``global_embedding`` (B, D).
        """
        x = (
            images
            if isinstance(images, torch.Tensor)
            else self.backbone.preprocess(images, device=self.device)
        )
        with torch.no_grad():
            return self.backbone.encode_image(
                x.to(self.device),
                layers=self.layers,
                vv_start=self.vv_start,
                global_ln_post=self.global_ln_post,
            )
