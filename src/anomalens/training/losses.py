"""Training losses of the CLIP-adapter recipes (AdaptCLIP, AnomalyCLIP): one copy of each.

Both official recipes use the same pixel loss on a 2-channel probability map ``S`` (channel 0
normal, 1 abnormal) and a ground-truth mask ``m``:
``Focal(S, m) + Dice(S_abnormal, m) + Dice(S_normal, 1 - m)`` (:func:`segmentation_loss`), plus
a cross-entropy on the image logits. They differ only in how the heads are summed
(:func:`head_loss` for AdaptCLIP, :func:`anomalyclip_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["anomalyclip_loss", "dice_loss", "focal_loss", "head_loss", "segmentation_loss"]


def focal_loss(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """Focal loss on probabilities (no alpha), with label smoothing, mean over all pixels.

    With the one-hot target clamped to ``[smooth / (C - 1), 1 - smooth]``:
    ``p_t = sum_c onehot_c * p_c + smooth`` and the loss is ``mean(-(1 - p_t)^gamma log p_t)``
    (the official form of both recipes).

    Args:
        probs: (B, C, H, W) class probabilities (channel 1 = abnormal for C = 2).
        target: (B, H, W) class per pixel ({0, 1} masks; any dtype, read as integers).
        gamma: focusing exponent.
        smooth: label smoothing and log guard.

    Returns:
        Scalar loss.
    """
    c = probs.shape[1]
    onehot = F.one_hot(target.long(), c).permute(0, 3, 1, 2).to(probs.dtype)
    onehot = onehot.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * probs).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image, averaged: ``1 - (2 sum(p g) + s) / (sum p + sum g + s)``.

    Args:
        pred: (B, H, W) probabilities.
        target: (B, H, W) {0, 1} ground truth.
        smooth: additive smoothing.

    Returns:
        Scalar loss.
    """
    p = pred.flatten(1)
    g = target.to(pred.dtype).flatten(1)
    dice = (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return (1 - dice).mean()


def segmentation_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``Focal(S, m) + Dice(S_abnormal, m) + Dice(S_normal, 1 - m)`` of one 2-channel map.

    Args:
        maps: (B, 2, S, S) probability maps [normal, abnormal].
        masks: (B, S, S) {0, 1} ground truth (any dtype).

    Returns:
        Scalar loss.
    """
    m = masks.to(maps.dtype)
    return focal_loss(maps, m.long()) + dice_loss(maps[:, 1], m) + dice_loss(maps[:, 0], 1 - m)


def head_loss(
    logits: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Losses of one AdaptCLIP head.

    Args:
        logits: (B, 2) image logits.
        maps: (B, 2, S, S) probability maps.
        labels: (B,) long {0, 1}.
        masks: (B, S, S) {0, 1}.

    Returns:
        ``global`` (cross-entropy) and ``local`` (:func:`segmentation_loss`) scalars.
    """
    return {"global": F.cross_entropy(logits, labels), "local": segmentation_loss(maps, masks)}


def anomalyclip_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    layer_maps: Sequence[torch.Tensor],
    masks: torch.Tensor,
    pixel_weight: float = 4.0,
) -> dict[str, torch.Tensor]:
    """AnomalyCLIP's loss: ``CE(logits, y) + lambda sum_layers segmentation_loss(S_l, m)``.

    Args:
        logits: (B, 2) image logits (``g . t / tau``, not softmaxed).
        labels: (B,) 0 normal / 1 anomalous.
        layer_maps: per layer (B, 2, S, S) probability maps.
        masks: (B, S, S) {0, 1} ground truth.
        pixel_weight: lambda (official 4, hard-coded in train.py).

    Returns:
        ``loss`` (total), ``image_loss``, ``pixel_loss`` (already multiplied by lambda); scalars.
    """
    image_loss = F.cross_entropy(logits, labels.long())
    m = masks.to(logits.dtype)
    pixel = logits.new_zeros(())
    for s in layer_maps:
        pixel = pixel + segmentation_loss(s, m)
    pixel = pixel_weight * pixel
    return {"loss": image_loss + pixel, "image_loss": image_loss, "pixel_loss": pixel}
