"""From a scored image to its decision and result images: one path for ``predict`` and the service.

Both front ends judge a score against a :class:`~anomalens.thresholds.Threshold`, resize the
anomaly map to the image, cut the predicted mask at the pixel threshold and draw the overlay the
same way, so that the CLI, the API and the service agree to the last pixel. Only where the files
go differs (``targets``).

Two rules hold for every output:

* **No region on a normal image.** The predicted mask (and the outline on the overlay) is empty
  when the image is judged normal, whatever the map holds: a region is only drawn where the
  image itself is flagged. :attr:`JudgedImage.region` keeps the pixels above the pixel threshold
  regardless of the decision (the review page shows them when its threshold slider flags the
  image).
* **Normalised score.** Beside the raw score, ``normalized_score`` in [0, 1] puts the threshold
  at 0.5, as anomalib reports it: ``clip((score - threshold) / (max - min) + 0.5, 0, 1)``, where
  (min, max) is the range of the normal scores the threshold was set from (see
  :func:`score_scale`). It is None when the threshold records no such range (a fixed
  ``--threshold``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalens.fileio import atomic_save_png
from anomalens.thresholds import Threshold
from anomalens.viz.overlay import (
    heat_rgba,
    heatmap_rgb,
    normalize_map,
    outline_rgba,
    overlay,
    resize_map,
)

__all__ = [
    "RESULT_IMAGE_KINDS",
    "JudgedImage",
    "judge_image",
    "normalized_score",
    "score_scale",
    "write_result_images",
]

#: The result images that can be written for a scored image: ``overlay`` (image + translucent
#: heat + outline of the mask), ``mask`` (binary), ``heatmap`` (opaque colours), and the review
#: page's layers ``heat_layer`` (RGBA, opacity growing with the value, at the detector's working
#: size S x S: the page stretches it over the image) and ``region_layer`` (RGBA outline of the
#: region above the pixel threshold, whatever the decision, at the image's size).
RESULT_IMAGE_KINDS = ("overlay", "mask", "heatmap", "heat_layer", "region_layer")


@dataclass
class JudgedImage:
    """A scored image judged against a threshold.

    Attributes:
        score: the image score.
        decision: ``"anomalous"`` or ``"normal"``.
        anomaly_map: (H, W) float32 map at the image's own size.
        mask: (H, W) bool predicted defect region: the map above the pixel threshold when the
            image is anomalous, empty when it is normal.
        region: (H, W) bool map above the pixel threshold, whatever the decision.
        normalized_score: score in [0, 1] with the threshold at 0.5, or None (see
            :func:`normalized_score`).
        working_map: (S, S) the map as the detector gave it (the review page's heat layer is
            drawn at this size and scaled by the browser: a fraction of the image's pixels).
    """

    score: float
    decision: str
    anomaly_map: np.ndarray
    mask: np.ndarray
    region: np.ndarray
    normalized_score: float | None = None
    working_map: np.ndarray | None = None


def score_scale(thr: Threshold) -> tuple[float, float] | None:
    """The (min, max) of the normal scores a threshold was set from, or None when unknown.

    Calibrated thresholds (leave-one-out, normal folder, batch-robust in ``predict``) record
    ``normal_score_min`` / ``normal_score_max`` in their details; a method's default threshold
    on probability scores spans (0, 1); a fixed threshold records no range.
    """
    d = thr.details or {}
    if "normal_score_min" in d and "normal_score_max" in d:
        lo, hi = float(d["normal_score_min"]), float(d["normal_score_max"])
    elif thr.method == "default":
        lo, hi = 0.0, 1.0
    else:
        return None
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return None
    return lo, hi


def normalized_score(score: float, thr: Threshold) -> float | None:
    """Score in [0, 1] with the threshold at 0.5 (anomalib's min-max convention).

    ``clip((score - thr.value) / (max - min) + 0.5, 0, 1)`` with (min, max) from
    :func:`score_scale`. Above 0.5 means anomalous, exactly as ``thr.decide`` says (a score
    equal to the threshold gives 0.5 and is normal). None when the scale is unknown or empty
    (a fixed threshold, a single normal score).
    """
    scale = score_scale(thr)
    if scale is None or not math.isfinite(score):
        return None
    lo, hi = scale
    return float(min(1.0, max(0.0, (score - thr.value) / (hi - lo) + 0.5)))


def judge_image(
    image: np.ndarray, anomaly_map: np.ndarray, score: float, thr: Threshold
) -> JudgedImage:
    """Decide on one image and cut its mask (empty when the image is judged normal).

    Args:
        image: (H, W, 3) uint8, the image as read.
        anomaly_map: (S, S) map at the detector's working size.
        score: the image score.
        thr: the run's threshold (image and pixel values).
    """
    h, w = image.shape[:2]
    full = resize_map(anomaly_map, h, w)
    decision = thr.decide(float(score))
    region = full > thr.pixel_threshold
    mask = region if decision == "anomalous" else np.zeros_like(region)
    return JudgedImage(
        float(score),
        decision,
        full,
        mask,
        region,
        normalized_score(float(score), thr),
        np.asarray(anomaly_map, dtype=np.float32),
    )


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
        targets: kind (see :data:`RESULT_IMAGE_KINDS`) -> path relative to ``out_dir``.
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
        elif kind == "heat_layer":
            small = judged.working_map if judged.working_map is not None else judged.anomaly_map
            pixels = heat_rgba(normalize_map(small, thr.vis_range))
        elif kind == "region_layer":
            pixels = outline_rgba(judged.region)
        else:
            pixels = heatmap_rgb(normalize_map(judged.anomaly_map, thr.vis_range))
        atomic_save_png(Path(out_dir) / rel, pixels)
