"""Reference-based evaluation: every test image scored against its own reference (k = 1).

Used by ``anomalens benchmark --dataset pairs`` (the DeepPCB layout, :mod:`anomalens.data.pairs`).
Maps are compared with the masks at each image's own size (the map is resized bilinearly to the
image), so methods of every working size are measured on the same pixels; boxes are painted
with inclusive corners. Image-level metrics need normal test images, which DeepPCB lacks: they
are then NaN (with a warning), and the pixel metrics carry the comparison.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from anomalens.data.io import ImageReadError, load_image
from anomalens.data.pairs import load_pair_mask
from anomalens.detectors.base import Detector
from anomalens.metrics import PixelMetricAccumulator, image_metrics
from anomalens.types import Sample
from anomalens.viz.overlay import resize_map

__all__ = ["evaluate_pairs"]


def evaluate_pairs(
    detector: Detector,
    test: Sequence[Sample],
    *,
    pixel_mode: str = "exact",
    progress: bool = False,
    desc: str = "pairs",
    category: str | None = None,
) -> dict[str, Any]:
    """Fit on each sample's reference, score the sample, compute all metrics.

    Raises:
        ValueError: a method that takes no reference (zero-shot / batch methods), or no pair
            could be read.
    """
    if not detector.uses_normal_images:
        raise ValueError(f"{detector.name} takes no reference image: it cannot score pairs")
    acc = PixelMetricAccumulator(mode=pixel_mode)  # type: ignore[arg-type]
    scores: list[float] = []
    labels: list[int] = []
    errors: list[dict[str, str]] = []
    per_image: list[dict[str, Any]] = []
    seconds = 0.0
    for s in tqdm(test, desc=desc, unit="pair", disable=not progress, leave=False):
        if s.reference_path is None:
            errors.append({"path": str(s.image_path), "error": "no reference"})
            continue
        try:
            im = load_image(s.image_path)
            ref = load_image(s.reference_path)
            mask = (
                load_pair_mask(s.mask_path, im.shape[:2])
                if s.mask_path is not None
                else np.zeros(im.shape[:2], dtype=bool)
            )
        except ImageReadError as exc:
            errors.append({"path": exc.path, "error": exc.reason})
            continue
        t = time.perf_counter()
        detector.fit([ref], category=category)
        sc, mp = detector.predict([im]).to_numpy()
        seconds += time.perf_counter() - t
        h, w = im.shape[:2]
        acc.update(resize_map(mp[0], h, w)[None], mask[None])
        scores.append(float(sc[0]))
        labels.append(int(s.label))
        per_image.append(
            {
                "path": str(s.image_path),
                "label": int(s.label),
                "defect_type": s.defect_type,
                "score": float(sc[0]),
            }
        )
    if not scores:
        raise ValueError("no pair of the category could be read")
    metrics: dict[str, Any] = image_metrics(np.asarray(scores), np.asarray(labels))
    metrics.update(acc.compute())
    metrics["num_test_images"] = len(scores)
    metrics["seconds_per_image"] = seconds / len(scores)
    metrics["errors"] = errors
    metrics["per_image"] = per_image
    return metrics
