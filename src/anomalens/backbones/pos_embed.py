"""Resizing a ViT positional embedding to another patch grid (the one function for it).

The CLIP anomaly-detection references resize the pretrained positional embedding of the vision
tower when they run it at another input size: AdaptCLIP and AnomalyCLIP with bilinear
interpolation, MuSc with bicubic, both with ``align_corners=False``, no antialias, the CLS row
kept as is. :func:`resize_positional_embedding` does both (``mode``); :class:`ClipBackbone`
(``pos_embed_mode``) and :func:`~anomalens.backbones.clip_build.musc_clip_backbone` call it.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

__all__ = ["POS_EMBED_MODES", "PosEmbedMode", "resize_positional_embedding"]

#: Interpolation of the grid rows: ``"bilinear"`` (AdaptCLIP, AnomalyCLIP) or ``"bicubic"`` (MuSc).
PosEmbedMode = Literal["bilinear", "bicubic"]
POS_EMBED_MODES: tuple[str, ...] = get_args(PosEmbedMode)


def resize_positional_embedding(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    mode: PosEmbedMode = "bilinear",
) -> torch.Tensor:
    """Resize a ViT positional embedding to a new patch grid, as the CLIP anomaly references do.

    The CLS row is kept; the other rows are reshaped to the old grid and resized with ``mode``
    interpolation (``align_corners=False``, no antialias), computed in float32.

    Args:
        pos_embed: (1 + h0*w0, W) embedding, CLS row first, grid rows row-major.
        old_grid: (h0, w0).
        new_grid: (h, w).
        mode: ``"bilinear"`` (AdaptCLIP / AnomalyCLIP) or ``"bicubic"`` (MuSc).

    Returns:
        (1 + h*w, W) tensor with the dtype and device of ``pos_embed`` (a copy when the grid is
        unchanged).

    Raises:
        ValueError: the row count does not match ``old_grid``, or an unknown ``mode``.
    """
    if mode not in POS_EMBED_MODES:
        raise ValueError(
            f"positional-embedding resize mode must be one of {POS_EMBED_MODES}, got {mode!r}"
        )
    h0, w0 = old_grid
    if pos_embed.ndim != 2 or pos_embed.shape[0] != 1 + h0 * w0:
        raise ValueError(
            f"positional embedding of shape {tuple(pos_embed.shape)} does not have "
            f"1 + {h0}*{w0} rows"
        )
    if tuple(new_grid) == (h0, w0):
        return pos_embed.clone()
    cls_row, grid = pos_embed[:1], pos_embed[1:]
    width = pos_embed.shape[1]
    g = grid.float().reshape(1, h0, w0, width).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=tuple(new_grid), mode=mode, align_corners=False, antialias=False)
    g = g.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width).to(pos_embed.dtype)
    return torch.cat([cls_row, g], dim=0)
