"""Batch preprocessing: squash-resize to S x S, scale, normalise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anomalens.data.io import ImageLike, as_rgb_array

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "resize_mask", "to_batch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def to_batch(
    images: Sequence[ImageLike],
    size: int | tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Resize every image to ``size`` (aspect ratio not kept, PIL filter) and normalise.

    The resize runs on the CPU (PIL, skipped for images already at ``size``); the batch then
    travels as uint8 (a quarter of the float32 bytes) and is normalised on ``device``, with
    the same float32 operations, so the result is the same on every device.

    Args:
        images: arrays, PIL images or paths.
        size: output S or (H, W).
        mean: per-channel mean (of x / 255).
        std: per-channel standard deviation.
        interpolation: PIL filter name.
        device: where the normalised batch is made (None: the CPU).

    Returns:
        (B, 3, H, W) float32 tensor on ``device``: ``(x / 255 - mean) / std``.
    """
    h, w = (size, size) if isinstance(size, int) else size
    flt = _PIL_FILTERS[interpolation]
    out = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        arr = as_rgb_array(im)
        if arr.shape[:2] != (h, w):
            arr = np.asarray(Image.fromarray(arr).resize((w, h), flt))
        out[i] = arr
    x = torch.from_numpy(out)
    if device is not None and torch.device(device).type != "cpu":
        x = (
            x.pin_memory().to(device, non_blocking=True)
            if torch.cuda.is_available()
            else x.to(device)
        )
    x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a bool (H, W) mask with bilinear interpolation, then binarise at 0.5.

    The toolkit default mask rule (evaluation.md §4: AdaptCLIP / Accurate-WinCLIP convention).
    """
    h, w = (size, size) if isinstance(size, int) else size
    if mask.shape == (h, w):
        return mask.astype(bool)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    r = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return (r[0, 0] > 0.5).numpy()
