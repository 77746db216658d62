"""Decision thresholds set without labelled defects.

Three policies, each recorded with the results (``Threshold.to_dict``):

* ``fixed``: a value given by the user.
* ``normal-folder``: score a separate folder of normal images with the fitted detector and take
  a percentile of their scores (times an optional margin).
* ``batch-robust`` (batch zero-shot methods such as MuSc, with no normal image): the scored
  batch itself, assumed mostly normal (MuSc's own premise): median + k · 1.4826 · MAD. The
  assumption is checked (:func:`check_mostly_normal`): a batch whose scores split into two
  well-separated groups with a large upper group, or with many images beyond the threshold,
  gets a warning in the log and in the threshold's details (run.json, report).
* ``leave-one-out``: with k >= 2 shots, fit on k-1 shots and score the held-out one, k times;
  the threshold is a percentile of those k held-out scores (default: the maximum) times a margin.
  For zero-shot detectors the k shots are simply scored (nothing to leave out).

The same rule gives a *pixel* threshold (for binary masks) from the pixel values of the
normal images' anomaly maps.
"""

from __future__ import annotations

import logging
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
    "check_mostly_normal",
    "fixed_threshold",
    "pixel_sample_positions",
]


log = logging.getLogger(__name__)

#: What the batch-robust threshold assumes, recorded with it.
BATCH_ASSUMPTION = (
    "mostly normal batch: well over half of the images are normal, so the median and MAD of "
    "the scores describe normal images"
)


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


#: Pixels of a batch's maps that the batch-robust pixel threshold looks at, at most.
PIXEL_SAMPLE_SIZE = 1_000_000


def pixel_sample_positions(num_pixels: int) -> np.ndarray:
    """Which pixels :func:`batch_robust_threshold` takes from a batch of ``num_pixels``.

    Positions into the batch's maps flattened in order (image after image, row-major): all
    of them up to :data:`PIXEL_SAMPLE_SIZE`, else a seeded sample of that many (seed 0,
    without replacement). Depends on the count only, so the pixels can be gathered from maps
    held in different places (e.g. shards on other machines).

    Returns:
        (min(num_pixels, PIXEL_SAMPLE_SIZE),) int64 positions.
    """
    if num_pixels <= PIXEL_SAMPLE_SIZE:
        return np.arange(num_pixels, dtype=np.int64)
    rng = np.random.default_rng(0)
    return rng.choice(num_pixels, PIXEL_SAMPLE_SIZE, replace=False).astype(np.int64)


def batch_robust_threshold(
    scores: np.ndarray,
    maps: np.ndarray | None = None,
    *,
    k: float = 3.0,
    pixels: np.ndarray | None = None,
) -> Threshold:
    """Outlier threshold from a batch that is mostly normal: median + k · 1.4826 · MAD.

    For batch zero-shot methods (MuSc) run without any normal image. The pixel threshold uses
    the same rule on the pixel values of the maps (a seeded sample of at most 10^6 pixels,
    :func:`pixel_sample_positions`).

    Args:
        scores: (N,) image scores of the batch.
        maps: (N, H, W) anomaly maps of the batch (or give ``pixels``).
        k: MADs above the median.
        pixels: instead of ``maps``: the maps' values at :func:`pixel_sample_positions`.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size < 3:
        raise ValueError("a batch-robust threshold needs at least 3 scored images")
    if (maps is None) == (pixels is None):
        raise ValueError("batch_robust_threshold needs either maps or pixels")

    def rule(x: np.ndarray) -> float:
        med = float(np.median(x))
        mad = float(np.median(np.abs(x - med))) * 1.4826
        return med + k * max(mad, 1e-12)

    if pixels is None:
        pix = np.asarray(maps, dtype=np.float32).reshape(-1)
        pix = pix[pixel_sample_positions(pix.size)]
    else:
        pix = np.asarray(pixels, dtype=np.float32).reshape(-1)
    pixel_value = rule(pix)
    lo = float(np.percentile(pix, 1.0))
    value = rule(scores)
    check = check_mostly_normal(scores, value)
    details: dict[str, Any] = {
        "k": k,
        "num_scores": int(scores.size),
        "rule": "median + k*1.4826*MAD",
        "assumes": BATCH_ASSUMPTION,
        "assumption_check": {key: v for key, v in check.items() if key != "warning"},
    }
    if check.get("warning"):
        details["warning"] = check["warning"]
        log.warning("batch-robust threshold: %s", check["warning"])
    return Threshold(
        value=value,
        pixel_value=pixel_value,
        method="batch-robust",
        details=details,
        vis_range=(lo, max(2.0 * pixel_value - lo, pixel_value + 1e-6)),
    )


def _two_groups(scores: np.ndarray) -> tuple[int, float]:
    """Best split of sorted scores into a low and a high group (Otsu: largest between-group
    variance) and the separation of the groups as Ashman's D.

    Args:
        scores: (N,) sorted scores, N >= 4.

    Returns:
        (size of the high group, D); D > 2 means two clearly separated groups.
    """
    n = scores.size
    best, cut = -1.0, n // 2
    for i in range(2, n - 1):  # at least 2 scores per group
        lo, hi = scores[:i], scores[i:]
        between = i * (n - i) * (hi.mean() - lo.mean()) ** 2
        if between > best:
            best, cut = between, i
    lo, hi = scores[:cut], scores[cut:]
    spread = math.sqrt(float(lo.var() + hi.var()))
    d = math.sqrt(2.0) * float(hi.mean() - lo.mean()) / max(spread, 1e-12)
    return n - cut, d


def check_mostly_normal(
    scores: np.ndarray,
    threshold: float,
    *,
    max_flagged: float = 0.4,
    min_separation: float = 4.5,
    min_high_group: float = 0.25,
) -> dict[str, Any]:
    """Check the batch-robust threshold's assumption (a mostly normal batch) on its scores.

    Signs that it does not hold: more than ``max_flagged`` of the images lie beyond the
    threshold; or the scores split into two well-separated groups (Ashman's D of the best
    two-group split >= ``min_separation``; a single Gaussian batch of 40 gives D < 4 in 99 % of
    draws) whose upper group holds at least ``min_high_group`` of the images while the
    threshold flags fewer than half of that group (a largely defective batch pulls the median
    and MAD up, and the threshold above most of its defects). A batch with no image flagged at
    all is reported too: from the scores alone an all-normal batch cannot be told from a
    largely defective one whose scores overlap the normal ones (a 60 %-defective batch gives
    none flagged as well), so the user has to look.

    Args:
        scores: (N,) image scores of the batch.
        threshold: the batch-robust threshold.

    Returns:
        ``flagged_fraction``, ``high_group_fraction``, ``separation`` (Ashman's D) and, when
        the assumption looks violated, ``warning`` (one sentence for the user).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    n = s.size
    flagged = int((s > threshold).sum())
    out: dict[str, Any] = {"flagged_fraction": flagged / max(n, 1)}
    if n >= 6:
        high, d = _two_groups(s)
        out.update({"high_group_fraction": high / n, "separation": d})
    else:
        high, d = 0, 0.0
    problems = []
    if flagged == 0 and n >= 10 and not (d >= min_separation and high >= min_high_group * n):
        out["warning"] = (
            f"no image of {n} lies beyond it. It assumes a {BATCH_ASSUMPTION.split(':')[0]} "
            "with defects as outliers, and cannot tell an all-normal batch from a largely "
            "defective one whose scores overlap the normal ones. Check the score histogram in "
            "the report, or set the threshold from normal images (--calibration DIR) or "
            "--threshold VALUE"
        )
        return out
    if flagged / max(n, 1) > max_flagged:
        problems.append(f"{flagged} of {n} images lie beyond it")
    if d >= min_separation and high >= min_high_group * n and flagged < high / 2:
        problems.append(
            f"the scores form two separate groups (Ashman's D {d:.1f}) whose upper group holds "
            f"{high} of {n} images, yet only {flagged} are flagged"
        )
    if problems:
        out["warning"] = (
            f"it assumes a {BATCH_ASSUMPTION.split(':')[0]}, but {' and '.join(problems)}: the "
            "batch may be largely defective. Check the score histogram in the report, or set "
            "the threshold from normal images (--calibration DIR) or --threshold VALUE"
        )
    return out
