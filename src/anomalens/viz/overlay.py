"""Heat-map overlays and binary masks as images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["heatmap_rgb", "normalize_map", "overlay", "resize_map"]


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinearly resize an (h, w) map to (height, width) (float32)."""
    if anomaly_map.shape == (height, width):
        return anomaly_map.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


def normalize_map(
    anomaly_map: np.ndarray, vis_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Scale a map to [0, 1] for display: by ``vis_range`` (lo, hi) or by its own min/max."""
    lo, hi = (
        vis_range if vis_range is not None else (float(anomaly_map.min()), float(anomaly_map.max()))
    )
    if hi <= lo:
        return np.zeros_like(anomaly_map, dtype=np.float32)
    return np.clip((anomaly_map - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def heatmap_rgb(normalized: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours of a matplotlib colour map."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](normalized)
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    vis_range: tuple[float, float] | None = None,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """Blend a heat map (resized to the image) over an (H, W, 3) uint8 image.

    Args:
        image: (H, W, 3) uint8 RGB.
        anomaly_map: (h, w) float map at any resolution.
        vis_range: colour-scale range; None uses the map's own min/max.
        mask: optional (H, W) bool predicted mask, outlined in white.
        alpha: heat-map opacity.
    """
    h, w = image.shape[:2]
    heat = heatmap_rgb(normalize_map(resize_map(anomaly_map, h, w), vis_range), cmap)
    out = (image.astype(np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha).astype(
        np.uint8
    )
    if mask is not None and mask.any():
        m = mask.astype(bool)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 255
    return out
