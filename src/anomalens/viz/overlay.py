"""Heat-map overlays, outlines, colour bars and binary masks as images.

An overlay keeps the part's texture visible: the heat map is blended with a per-pixel opacity
that grows with the anomaly value (low values leave the image untouched), and the predicted
region is drawn as an outline rather than filled.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "colorbar_rgb",
    "heat_rgba",
    "heatmap_rgb",
    "normalize_map",
    "outline",
    "outline_rgba",
    "overlay",
    "resize_map",
]

#: Colour of predicted-region outlines (RGB).
OUTLINE_RGB = (255, 255, 255)


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


def heat_rgba(normalized: np.ndarray, *, max_alpha: float = 1.0, cmap: str = "jet") -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 4) uint8 heat layer, opacity growing with the value.

    A value of 0 is fully transparent, 1 has opacity ``max_alpha``: laid over the image, the
    heat shows where the map is high and leaves the texture visible elsewhere.
    """
    rgb = heatmap_rgb(normalized, cmap)
    alpha = (np.clip(normalized, 0.0, 1.0) * (255.0 * max_alpha) + 0.5).astype(np.uint8)
    return np.dstack([rgb, alpha])


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool inner boundary of ``mask``, ``width`` pixels thick (image borders count)."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.zeros_like(m)
    inner = ndimage.binary_erosion(m, iterations=width, border_value=0)
    return m & ~inner


def outline_rgba(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W, 4) uint8 layer: the outline of ``mask`` in :data:`OUTLINE_RGB`, transparent elsewhere.

    The outline is drawn with a one-pixel dark edge on its outside so that it stays visible
    on bright parts.
    """
    edge = outline(mask, width)
    out = np.zeros((*edge.shape, 4), np.uint8)
    if edge.any():
        halo = ndimage.binary_dilation(edge, iterations=1) & ~np.asarray(mask, dtype=bool)
        out[halo] = (0, 0, 0, 200)
        out[edge] = (*OUTLINE_RGB, 255)
    return out


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    vis_range: tuple[float, float] | None = None,
    mask: np.ndarray | None = None,
    alpha: float = 0.6,
    cmap: str = "jet",
) -> np.ndarray:
    """Translucent heat map (resized to the image) and the mask's outline over the image.

    Args:
        image: (H, W, 3) uint8 RGB.
        anomaly_map: (h, w) float map at any resolution.
        vis_range: colour-scale range; None uses the map's own min/max.
        mask: optional (H, W) bool predicted region, outlined (nothing drawn when empty).
        alpha: opacity of the heat map where it is highest; lower values are more transparent.

    Returns:
        (H, W, 3) uint8.
    """
    h, w = image.shape[:2]
    layer = heat_rgba(
        normalize_map(resize_map(anomaly_map, h, w), vis_range), max_alpha=alpha, cmap=cmap
    )
    out = _compose(image.astype(np.float32), layer)
    if mask is not None and np.asarray(mask).any():
        out = _compose(out, outline_rgba(mask))
    return (out + 0.5).astype(np.uint8)


def _compose(base: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """(H, W, 3) float base with an (H, W, 4) uint8 layer composited over it ("over")."""
    a = layer[..., 3:4].astype(np.float32) / 255.0
    return base * (1.0 - a) + layer[..., :3].astype(np.float32) * a


def colorbar_rgb(
    vis_range: tuple[float, float],
    marks: Mapping[str, float] | None = None,
    *,
    cmap: str = "jet",
    width_px: int = 640,
    height_px: int = 110,
) -> np.ndarray:
    """A labelled horizontal colour bar of the heat-map scale, as an (h, w, 3) uint8 image.

    Args:
        vis_range: (lo, hi) anomaly-map values at the two ends of the colour scale.
        marks: label -> map value drawn as a vertical line (e.g. the pixel threshold).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lo, hi = float(vis_range[0]), float(vis_range[1])
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.04, 0.42, 0.92, 0.3))
    ax.imshow(np.linspace(0, 1, 256)[None, :], aspect="auto", cmap=cmap, extent=(lo, hi, 0, 1))
    ax.set_yticks([])
    ax.set_xlim(lo, hi)
    ax.tick_params(labelsize=9)
    ax.set_xlabel("anomaly-map value (heat colour scale)", fontsize=9, labelpad=1)
    for label, value in (marks or {}).items():
        if lo <= value <= hi:
            ax.axvline(value, color="white", linewidth=2)
            ax.axvline(value, color="black", linewidth=1, linestyle="--")
            ax.text(
                value, 1.05, label, fontsize=9, ha="center", va="bottom", transform=ax.transData
            )
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])
