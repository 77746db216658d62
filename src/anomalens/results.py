"""From a scored image to its decision and result images: one path for ``predict`` and the service.

Both front ends judge a score against a :class:`~anomalens.thresholds.Threshold`, resize the
anomaly map to the image, cut the predicted mask at the pixel threshold and draw the overlay the
same way, so that the CLI, the API and the service agree to the last pixel. Only where the files
go differs (``targets``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalens._fileio import atomic_save_png
from anomalens.thresholds import Threshold
from anomalens.viz.overlay import heatmap_rgb, normalize_map, overlay, resize_map

__all__ = ["RESULT_IMAGE_KINDS", "JudgedImage", "judge_image", "write_result_images"]

#: The result images that can be written for a scored image.
RESULT_IMAGE_KINDS = ("overlay", "mask", "heatmap")


@dataclass
class JudgedImage:
    """A scored image judged against a threshold.

    Attributes:
        score: the image score.
        decision: ``"anomalous"`` or ``"normal"``.
        anomaly_map: (H, W) float32 map at the image's own size.
        mask: (H, W) bool predicted defect region (map above the pixel threshold).
    """

    score: float
    decision: str
    anomaly_map: np.ndarray
    mask: np.ndarray


def judge_image(
    image: np.ndarray, anomaly_map: np.ndarray, score: float, thr: Threshold
) -> JudgedImage:
    """Decide on one image and cut its mask.

    Args:
        image: (H, W, 3) uint8, the image as read.
        anomaly_map: (S, S) map at the detector's working size.
        score: the image score.
        thr: the run's threshold (image and pixel values).
    """
    h, w = image.shape[:2]
    full = resize_map(anomaly_map, h, w)
    return JudgedImage(float(score), thr.decide(float(score)), full, full > thr.pixel_threshold)


def write_result_images(
    out_dir: Path,
    targets: Mapping[str, str],
    image: np.ndarray,
    judged: JudgedImage,
    thr: Threshold,
) -> None:
    """Write the requested result images atomically.

    Args:
        out_dir: folder the relative target paths are taken from.
        targets: kind (``overlay``, ``mask``, ``heatmap``) -> path relative to ``out_dir``.
        image: (H, W, 3) uint8, the image as read.
        judged: from :func:`judge_image`.
        thr: the threshold (its ``vis_range`` fixes the heat-map colour scale).
    """
    unknown = set(targets) - set(RESULT_IMAGE_KINDS)
    if unknown:
        raise ValueError(
            f"unknown result image kind(s) {sorted(unknown)}; use {RESULT_IMAGE_KINDS}"
        )
    for kind, rel in targets.items():
        if kind == "overlay":
            pixels = overlay(image, judged.anomaly_map, vis_range=thr.vis_range, mask=judged.mask)
        elif kind == "mask":
            pixels = judged.mask
        else:
            pixels = heatmap_rgb(normalize_map(judged.anomaly_map, thr.vis_range))
        atomic_save_png(Path(out_dir) / rel, pixels)
