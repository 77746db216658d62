"""Anomaly-map post-processing shared by all detectors: upsampling and Gaussian smoothing.

Pure tensor functions; they run on whatever device the input lives on (no host round trip).
``gaussian_smooth`` reproduces ``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect",
truncate=4.0)`` applied to each (H, W) map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel1d", "gaussian_smooth", "symmetric_pad_index", "upsample"]


def upsample(
    patch_scores: torch.Tensor,
    size: int | tuple[int, int],
    mode: str = "bilinear",
    align_corners: bool = False,
) -> torch.Tensor:
    """Resize patch-score grids to the image size (the one resize of every detector's maps).

    Args:
        patch_scores: (B, h, w) scores, or (B, C, h, w) maps (each channel resized alone).
        size: output size S or (H, W).
        mode: ``bilinear`` (PatchCore, WinCLIP, AdaptCLIP and AnomalyCLIP official), ``nearest``
            (anomalib) or ``bicubic``.
        align_corners: for ``bilinear`` / ``bicubic``: False (default, the references above) or
            True (MuSc official).

    Returns:
        (B, H, W) or (B, C, H, W) maps, same dtype and device as the input (the input itself when
        it already has the size).
    """
    if patch_scores.ndim not in (3, 4):
        raise ValueError(
            f"patch_scores must be (B, h, w) or (B, C, h, w), got {tuple(patch_scores.shape)}"
        )
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(patch_scores.shape[-2:]) == hw:
        return patch_scores
    x = patch_scores[:, None] if patch_scores.ndim == 3 else patch_scores
    if mode == "nearest":
        out = F.interpolate(x, size=hw, mode="nearest")
    elif mode in ("bilinear", "bicubic"):
        out = F.interpolate(x, size=hw, mode=mode, align_corners=align_corners)
    else:
        raise ValueError(f"upsample mode must be bilinear, bicubic or nearest, got {mode!r}")
    return out[:, 0] if patch_scores.ndim == 3 else out


def gaussian_kernel1d(
    sigma: float,
    truncate: float = 4.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (scipy's rule).

    Returns:
        (2r + 1,) weights that sum to 1.
    """
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    w = w / w.sum()
    return w.to(dtype=dtype, device=device)


def symmetric_pad_index(
    n: int, radius: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Source indices of a length-``n`` axis padded by ``radius`` on both sides, scipy "reflect".

    scipy's ``reflect`` is half-sample symmetric (``d c b a | a b c d | d c b a``), extended
    periodically with period 2n when the radius exceeds the axis length.

    Returns:
        (n + 2 * radius,) int64 indices into the axis.
    """
    i = torch.arange(-radius, n + radius, device=device)
    j = torch.remainder(i, 2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def _smooth_last_axis(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate the last axis of (N, L) rows with a symmetric kernel, reflect padding."""
    radius = (kernel.numel() - 1) // 2
    idx = symmetric_pad_index(x.shape[-1], radius, device=x.device)
    padded = x.index_select(-1, idx)[:, None]  # (N, 1, L + 2r)
    return F.conv1d(padded, kernel.view(1, 1, -1))[:, 0]


def gaussian_smooth(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of each map, equal to ``scipy.ndimage.gaussian_filter``.

    Args:
        maps: (B, H, W) float maps (any device).
        sigma: standard deviation in pixels; ``sigma <= 0`` returns the input unchanged.
        truncate: kernel radius in standard deviations (scipy default 4.0).

    Returns:
        (B, H, W) smoothed maps, same dtype and device.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got {tuple(maps.shape)}")
    if sigma <= 0:
        return maps
    if not maps.is_floating_point():
        raise TypeError(f"maps must be a floating-point tensor, got {maps.dtype}")
    if math.isnan(sigma):
        raise ValueError("sigma is NaN")
    b, h, w = maps.shape
    kernel = gaussian_kernel1d(sigma, truncate, dtype=maps.dtype, device=maps.device)
    # rows (last axis, W), then columns (H) via a transpose: scipy filters axis 0 first, but the
    # two 1-D passes commute exactly in exact arithmetic and within rounding in floating point.
    out = _smooth_last_axis(maps.reshape(b * h, w), kernel).reshape(b, h, w)
    out = out.transpose(1, 2).reshape(b * w, h)
    out = _smooth_last_axis(out, kernel).reshape(b, w, h).transpose(1, 2)
    return out.contiguous()
