"""Decision thresholds set without labelled defects.

Three policies, each recorded with the results (``Threshold.to_dict``):

* ``fixed``: a value given by the user.
* ``normal-folder``: score a separate folder of normal images with the fitted detector and take
  a percentile of their scores (times an optional margin).
* ``batch-robust`` (batch zero-shot methods such as MuSc, with no normal image): the scored
  batch itself, assumed mostly normal (MuSc's own premise): median + k · 1.4826 · MAD.
* ``leave-one-out``: with k >= 2 shots, fit on k-1 shots and score the held-out one, k times;
  the threshold is a percentile of those k held-out scores (default: the maximum) times a margin.
  For zero-shot detectors the k shots are simply scored (nothing to leave out).

The same rule gives a *pixel* threshold (for binary masks) from the pixel values of the
normal images' anomaly maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from anomalens.data.io import ImageLike
from anomalens.detectors.base import Detector

__all__ = [
    "Threshold",
    "batch_robust_threshold",
    "calibrate_leave_one_out",
    "calibrate_on_normals",
    "check_finite_threshold",
    "fixed_threshold",
]


@dataclass
class Threshold:
    """An image-level threshold (score > value = anomalous) and a pixel-level one for masks.

    Attributes:
        value: image-score threshold.
        pixel_value: anomaly-map threshold for binary masks (None: derived from ``value``).
        method: ``fixed``, ``normal-folder`` or ``leave-one-out``.
        details: how it was obtained (percentile, margin, number of normal scores, their range).
        vis_range: (lo, hi) of the heat-map colour scale, or None for per-image min/max.
    """

    value: float
    pixel_value: float | None
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    vis_range: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vis_range"] = list(self.vis_range) if self.vis_range is not None else None
        return d

    @property
    def pixel_threshold(self) -> float:
        """The anomaly-map value above which a pixel is in the predicted mask."""
        return self.value if self.pixel_value is None else self.pixel_value

    def decide(self, score: float) -> str:
        return "anomalous" if score > self.value else "normal"


def check_finite_threshold(value: float, what: str = "threshold") -> float:
    """``value`` as a float; NaN or an infinite value is refused.

    Raises:
        ValueError: a non-finite value (NaN would make every comparison false, inf would judge
            every image normal).
    """
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return v


def fixed_threshold(value: float, pixel_value: float | None = None) -> Threshold:
    """A threshold given by the user (pixel threshold defaults to the same value).

    Raises:
        ValueError: a non-finite value.
    """
    value = check_finite_threshold(value)
    if pixel_value is not None:
        pixel_value = check_finite_threshold(pixel_value, "pixel threshold")
    return Threshold(
        value=float(value),
        pixel_value=float(pixel_value if pixel_value is not None else value),
        method="fixed",
        details={"source": "user"},
    )


def _from_normals(
    scores: np.ndarray,
    maps: np.ndarray,
    method: str,
    percentile: float,
    margin: float,
    pixel_percentile: float,
    extra: dict[str, Any],
) -> Threshold:
    if scores.size == 0:
        raise ValueError("threshold calibration got no normal score")
    value = float(np.percentile(scores, percentile)) * margin
    pix = maps.reshape(-1)
    pixel_value = float(np.percentile(pix, pixel_percentile)) * margin
    lo = float(np.percentile(pix, 1.0))
    hi = max(2.0 * pixel_value - lo, pixel_value + 1e-6)
    details = {
        "percentile": percentile,
        "pixel_percentile": pixel_percentile,
        "margin": margin,
        "num_normal_scores": int(scores.size),
        "normal_score_min": float(scores.min()),
        "normal_score_max": float(scores.max()),
        **extra,
    }
    return Threshold(value, pixel_value, method, details, vis_range=(lo, hi))


def calibrate_on_normals(
    detector: Detector,
    normal_images: Sequence[ImageLike],
    *,
    percentile: float = 99.0,
    margin: float = 1.0,
    pixel_percentile: float = 99.9,
    batch_size: int = 8,
) -> Threshold:
    """Threshold from a separate folder of normal images scored by the fitted detector."""
    images = list(normal_images)
    if not images:
        raise ValueError("the calibration folder of normal images is empty")
    scores, maps = detector.predict_batches(images, batch_size).to_numpy()
    return _from_normals(
        scores,
        maps,
        "normal-folder",
        percentile,
        margin,
        pixel_percentile,
        {"num_images": len(images)},
    )


def calibrate_leave_one_out(
    make_detector: Callable[[], Detector],
    shots: Sequence[ImageLike],
    *,
    percentile: float = 100.0,
    margin: float = 1.0,
    pixel_percentile: float = 99.9,
    category: str | None = None,
) -> Threshold:
    """Threshold from the k shots alone (no extra images, no labelled defect).

    Detectors that use normal images: k fits on k-1 shots, each scoring the held-out shot
    (needs k >= 2). Detectors that ignore normal images, and zero-shot-capable detectors given
    a single shot: the shots are scored without a fit on them (nothing to leave out).

    Args:
        make_detector: builds a fresh, unfitted detector with the run's settings.
        shots: the k normal images.
        category: the object name passed to every ``fit`` (see ``Detector.fit``).
    """
    shots = list(shots)
    probe = make_detector()
    scores, maps = [], []
    if not probe.uses_normal_images or (len(shots) == 1 and probe.can_score_alone()):
        if len(shots) < probe.min_batch:
            raise ValueError(
                f"leave-one-out calibration of {probe.name} needs >= {probe.min_batch} normal "
                f"images (it scores them as one batch), got {len(shots)}"
            )
        s, m = probe.fit(None, category=category).predict_batches(shots).to_numpy()
        scores, maps = [s], [m]
    else:
        if len(shots) < 2:
            raise ValueError(
                "leave-one-out calibration needs at least 2 normal images (got "
                f"{len(shots)}); give more shots, a --calibration folder of normal images, "
                "or a fixed --threshold"
            )
        for i in range(len(shots)):
            # one detector refitted k times: fit() replaces the normal model, and a CLIP
            # backbone is built once instead of k times
            rest = shots[:i] + shots[i + 1 :]
            s, m = probe.fit(rest, category=category).predict([shots[i]]).to_numpy()
            scores.append(s)
            maps.append(m)
    return _from_normals(
        np.concatenate(scores),
        np.concatenate(maps),
        "leave-one-out",
        percentile,
        margin,
        pixel_percentile,
        {"num_shots": len(shots)},
    )


def batch_robust_threshold(scores: np.ndarray, maps: np.ndarray, *, k: float = 3.0) -> Threshold:
    """Outlier threshold from a batch that is mostly normal: median + k · 1.4826 · MAD.

    For batch zero-shot methods (MuSc) run without any normal image. The pixel threshold uses
    the same rule on the pixel values of the maps (a seeded sample of at most 10^6 pixels).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size < 3:
        raise ValueError("a batch-robust threshold needs at least 3 scored images")

    def rule(x: np.ndarray) -> float:
        med = float(np.median(x))
        mad = float(np.median(np.abs(x - med))) * 1.4826
        return med + k * max(mad, 1e-12)

    pix = np.asarray(maps, dtype=np.float32).reshape(-1)
    if pix.size > 1_000_000:
        pix = np.random.default_rng(0).choice(pix, 1_000_000, replace=False)
    pixel_value = rule(pix)
    lo = float(np.percentile(pix, 1.0))
    return Threshold(
        value=rule(scores),
        pixel_value=pixel_value,
        method="batch-robust",
        details={"k": k, "num_scores": int(scores.size), "rule": "median + k*1.4826*MAD"},
        vis_range=(lo, max(2.0 * pixel_value - lo, pixel_value + 1e-6)),
    )
