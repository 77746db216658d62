"""PatchCore-style few-shot detector: a memory bank of locally aware patch features.

Spec: ``methods/fewshot_baselines.md`` Part A. Features of two CNN stages are averaged over
3x3 neighbourhoods, merged on the finest grid, and stored for the K normal images. A test patch
scores its (k-NN mean) L2 distance to the bank; the map is upsampled (bilinear) and blurred
(Gaussian, sigma 4); the image score is the largest patch score (official code) or the
re-weighted score of the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from anomalens.backbones.cnn import CNNFeatureExtractor
from anomalens.backbones.factory import build_backbone
from anomalens.data.io import ImageLike
from anomalens.detectors.base import Detector
from anomalens.registry import register_detector
from anomalens.scoring.coreset import greedy_coreset
from anomalens.scoring.knn import knn, reweighted_image_score
from anomalens.scoring.maps import gaussian_smooth, upsample
from anomalens.types import LearningType, Prediction

__all__ = ["REDUCTIONS", "PatchCore", "embed_patches"]

REDUCTIONS = ("none", "adaptive_avg_1024")
IMAGE_SCORES = ("max", "reweighted")


def embed_patches(
    feature_maps: Sequence[torch.Tensor],
    reduction: str = "none",
    patch_size: int = 3,
    target_dim: int = 1024,
) -> torch.Tensor:
    """Locally aware patch features from several CNN layers.

    ``none`` (anomalib style): p x p average pooling (stride 1, zero padding) of every layer,
    bilinear resize to the first (finest) grid, channel concatenation: D = sum of C_l.
    ``adaptive_avg_1024`` (official PatchCore): each p x p neighbourhood is flattened
    channel-major (C_l * p * p), resized to the finest grid, adaptive-average-pooled to
    ``target_dim`` per layer, then the L layer vectors are concatenated and pooled to
    ``target_dim``: D = target_dim.

    Args:
        feature_maps: list of (B, C_l, h_l, w_l) maps, finest first.
        reduction: ``none`` or ``adaptive_avg_1024``.
        patch_size: neighbourhood size p (odd).
        target_dim: output size of the adaptive pooling.

    Returns:
        (B, D, h_0, w_0) patch features.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"patchcore reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd and >= 1, got {patch_size}")
    size = tuple(feature_maps[0].shape[-2:])
    pad = patch_size // 2
    parts = []
    for fmap in feature_maps:
        if reduction == "none":
            x = F.avg_pool2d(fmap, patch_size, stride=1, padding=pad) if patch_size > 1 else fmap
        else:
            b, c, h, w = fmap.shape
            x = F.unfold(fmap, patch_size, padding=pad).reshape(b, c * patch_size**2, h, w)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        parts.append(x)
    if reduction == "none":
        return torch.cat(parts, dim=1)
    b, h, w = parts[0].shape[0], size[0], size[1]
    pooled = []
    for x in parts:
        v = x.permute(0, 2, 3, 1).reshape(b * h * w, 1, x.shape[1])
        pooled.append(F.adaptive_avg_pool1d(v, target_dim))  # (N, 1, target_dim)
    stacked = torch.cat(pooled, dim=2)  # (N, 1, L * target_dim)
    out = F.adaptive_avg_pool1d(stacked, target_dim)[:, 0]  # (N, target_dim)
    return out.reshape(b, h, w, target_dim).permute(0, 3, 1, 2)


@register_detector("patchcore")
class PatchCore(Detector):
    """Few-shot PatchCore: nearest-neighbour distance to the K normal images' patch features.

    Args:
        backbone: a built ``CNNFeatureExtractor`` (``create_detector("patchcore",
            backbone=NAME, weights=..., layers=..., tf_padding=...)`` builds it), or a CNN preset
            name (``wide_resnet50_2``, ``resnet18``, ``mobilenet_v2_tf``, ...) built with the
            preset's own weights and layers.
        image_size: working size S: images are resized (squashed) to S x S and maps are S x S.
            Default 224: the official PatchCore input, the native size of the ImageNet CNNs,
            a multiple of 32 (TF padding exact), and a 28 x 28 patch grid.
        reduction: ``none`` (concatenate 3x3-averaged layers) or ``adaptive_avg_1024``.
        patch_size: neighbourhood p of the local aggregation.
        coreset_ratio: fraction of the bank kept by greedy coreset subsampling, or None (never).
        coreset_above: subsample only when the bank holds more than this many patches. With
            the default 10 000 the few-shot regime (K <= 12 at 224 with a stride-8 grid) keeps
            every patch; larger banks (many shots, big images) are reduced.
        k: nearest neighbours averaged per patch score.
        image_score: ``max`` (official code) or ``reweighted`` (paper / anomalib).
        reweight_neighbors: b of the re-weighting.
        sigma: Gaussian blur of the map, in pixels of the working size.
        upsample_mode: ``bilinear`` (official) or ``nearest`` (anomalib).
        batch_size: images per forward pass.
        seed: seed of the coreset projection and start point.
        device: torch device.
    """

    learning_type = LearningType.FEW_SHOT
    backbone_kind = "cnn"

    def __init__(
        self,
        backbone: str | CNNFeatureExtractor = "wide_resnet50_2",
        image_size: int = 224,
        reduction: str = "none",
        patch_size: int = 3,
        coreset_ratio: float | None = 0.1,
        coreset_above: int = 10_000,
        k: int = 1,
        image_score: str = "max",
        reweight_neighbors: int = 9,
        sigma: float = 4.0,
        upsample_mode: str = "bilinear",
        batch_size: int = 8,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(device=device)
        if reduction not in REDUCTIONS:
            raise ValueError(f"patchcore reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if image_score not in IMAGE_SCORES:
            raise ValueError(
                f"patchcore image_score must be one of {IMAGE_SCORES}, got {image_score!r}"
            )
        if k < 1:
            raise ValueError(f"patchcore k must be >= 1, got {k}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.extractor = build_backbone("cnn", backbone, device=self.device)
        self.image_size = int(image_size)
        self.reduction = reduction
        self.patch_size = int(patch_size)
        self.coreset_ratio = coreset_ratio
        self.coreset_above = int(coreset_above)
        self.k = int(k)
        self.image_score_mode = image_score
        self.reweight_neighbors = int(reweight_neighbors)
        self.sigma = float(sigma)
        self.upsample_mode = upsample_mode
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.memory_bank: torch.Tensor | None = None  # (M, D)
        self.bank_size_before_coreset = 0

    # ------------------------------------------------------------------ features
    def embed(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Patch features of images.

        Returns:
            (B, D, h, w) features on ``self.device``.
        """
        out = []
        for s in range(0, len(images), self.batch_size):
            x = self.extractor.preprocess(images[s : s + self.batch_size], self.image_size)
            feats = self.extractor(x.to(self.device))
            out.append(embed_patches(feats, self.reduction, self.patch_size))
        return torch.cat(out, dim=0)

    # ------------------------------------------------------------------ Detector API
    def _fit(self, normal_images: list[ImageLike]) -> None:
        feats = self.embed(normal_images)
        bank = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).contiguous()
        self.bank_size_before_coreset = int(bank.shape[0])
        if self.coreset_ratio is not None and bank.shape[0] > self.coreset_above:
            idx = greedy_coreset(bank, ratio=self.coreset_ratio, seed=self.seed)
            bank = bank[idx].contiguous()
        self.memory_bank = bank

    def _predict(self, images: list[ImageLike]) -> Prediction:
        assert self.memory_bank is not None
        bank = self.memory_bank
        k = min(self.k, bank.shape[0])
        scores, grids = [], []
        for s in range(0, len(images), self.batch_size):
            feats = self.embed(images[s : s + self.batch_size])  # (b, D, h, w)
            b, d, h, w = feats.shape
            queries = feats.permute(0, 2, 3, 1).reshape(b * h * w, d)
            dist, idx = knn(queries, bank, k=k)
            patch = dist.mean(1).reshape(b, h * w)
            if self.image_score_mode == "max":
                scores.append(patch.max(dim=1).values)
            else:
                scores.append(
                    reweighted_image_score(
                        patch,
                        queries.reshape(b, h * w, d),
                        idx[:, 0].reshape(b, h * w),
                        bank,
                        self.reweight_neighbors,
                    )
                )
            grids.append(patch.reshape(b, h, w))
        patch_scores = torch.cat(grids, dim=0)
        maps = upsample(patch_scores, self.image_size, mode=self.upsample_mode)
        maps = gaussian_smooth(maps, self.sigma)
        return Prediction(
            image_score=torch.cat(scores, dim=0),
            anomaly_map=maps,
            extras={"patch_scores": patch_scores.cpu()},
        )

    def config(self) -> dict[str, Any]:
        """Settings that determine the results."""
        cfg = super().config()
        cfg.update(self.extractor.describe())
        cfg.update(
            weights=self.extractor.weights,
            reduction=self.reduction,
            patch_size=self.patch_size,
            coreset_ratio=self.coreset_ratio,
            coreset_above=self.coreset_above,
            memory_bank_size=None if self.memory_bank is None else int(self.memory_bank.shape[0]),
            bank_size_before_coreset=self.bank_size_before_coreset,
            k=self.k,
            image_score=self.image_score_mode,
            reweight_neighbors=self.reweight_neighbors,
            sigma=self.sigma,
            upsample_mode=self.upsample_mode,
            batch_size=self.batch_size,
            seed=self.seed,
            device=str(self.device),
        )
        return cfg

    # ------------------------------------------------------------------ model files
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Memory bank (M, D) and the bank size before coreset subsampling (0-d)."""
        assert self.memory_bank is not None
        return {
            "memory_bank": self.memory_bank,
            "bank_size_before_coreset": torch.tensor(self.bank_size_before_coreset),
        }

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Restore the memory bank written by ``_state_tensors``."""
        bank = tensors["memory_bank"]
        if bank.ndim != 2:
            raise ValueError(f"memory_bank must be (M, D), got {tuple(bank.shape)}")
        self.memory_bank = bank.to(self.device)
        self.bank_size_before_coreset = int(tensors["bank_size_before_coreset"])
