"""Private helpers: tie-aware rank summaries and the metrics derived from them.

Every threshold metric used here (AUROC, step AP, trapezoidal AUPR, F1-max, AUPRO) only
changes value at the scores of *positive* samples: between two consecutive distinct
positive scores the recall (or per-region overlap) is constant and only the false-positive
count grows. A :class:`RankSummary` therefore stores, for every distinct positive score
``v_j`` in descending order, the positives at ``v_j`` and the negatives ``>= v_j`` and
``> v_j``. From these J rows each metric is computed exactly, ties included, as
scikit-learn defines it. The summary is built either from a sorted negative array and the
distinct positive scores (exact mode) or from histograms (binned mode: every bin is one tie
group).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RankSummary",
    "UndefinedMetricWarning",
    "ap_from_summary",
    "aupr_from_summary",
    "aupro_from_summary",
    "auroc_from_summary",
    "binning_error_bounds",
    "clipped_trapezoid",
    "f1max_from_summary",
    "summary_from_histograms",
    "summary_from_sorted",
    "undefined",
]


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (single class, no region); NaN is returned."""


def undefined(metric: str, reason: str) -> float:
    """Warn that ``metric`` is undefined and return NaN (never 0)."""
    warnings.warn(f"{metric} is undefined: {reason}; returning NaN", UndefinedMetricWarning, 3)
    return float("nan")


@dataclass(frozen=True)
class RankSummary:
    """Counts at every distinct positive score (or non-empty positive bin), descending.

    Attributes:
        pos: (J,) int64 positives in group j.
        neg_ge: (J,) int64 negatives with score >= group j's score.
        neg_gt: (J,) int64 negatives with score > group j's score.
        n_pos: total positives P.
        n_neg: total negatives N.
        region_weight: (J,) float64 sum of ``1/|R_k|`` over the positives of group j, where
            ``R_k`` is the ground-truth region of the pixel; None when regions are unknown.
        n_regions: number of regions K.
    """

    pos: np.ndarray
    neg_ge: np.ndarray
    neg_gt: np.ndarray
    n_pos: int
    n_neg: int
    region_weight: np.ndarray | None = None
    n_regions: int = 0


def summary_from_sorted(
    neg_sorted: np.ndarray,
    pos_values: np.ndarray,
    pos_counts: np.ndarray,
    region_weight: np.ndarray | None = None,
    n_regions: int = 0,
) -> RankSummary:
    """Build a summary from sorted negatives and the distinct positive scores.

    Args:
        neg_sorted: (N,) negative scores sorted ascending.
        pos_values: (J,) distinct positive scores, ascending, same dtype as ``neg_sorted``.
        pos_counts: (J,) positives at each value.
        region_weight: (J,) optional sum of ``1/|R_k|`` per value.
        n_regions: number of regions K.

    Returns:
        The summary with rows in descending score order.
    """
    n_neg = int(neg_sorted.size)
    left = np.searchsorted(neg_sorted, pos_values, side="left")
    # Only values that also occur among the negatives need a second search.
    right = left.copy()
    if n_neg:
        tied = neg_sorted[np.minimum(left, n_neg - 1)] == pos_values
        tied &= left < n_neg
        right[tied] = np.searchsorted(neg_sorted, pos_values[tied], side="right")
    weight = None if region_weight is None else np.ascontiguousarray(region_weight[::-1])
    return RankSummary(
        pos=np.ascontiguousarray(pos_counts[::-1], dtype=np.int64),
        neg_ge=(n_neg - left[::-1]).astype(np.int64),
        neg_gt=(n_neg - right[::-1]).astype(np.int64),
        n_pos=int(pos_counts.sum()),
        n_neg=n_neg,
        region_weight=weight,
        n_regions=n_regions,
    )


def summary_from_histograms(
    neg_hist: np.ndarray,
    pos_hist: np.ndarray,
    region_hist: np.ndarray | None = None,
    n_regions: int = 0,
) -> RankSummary:
    """Build a summary from per-bin counts; all samples of one bin count as tied.

    Args:
        neg_hist: (B,) negatives per bin, bins in ascending score order.
        pos_hist: (B,) positives per bin.
        region_hist: (B,) optional sum of ``1/|R_k|`` over the positives of each bin.
        n_regions: number of regions K.

    Returns:
        The summary over the non-empty positive bins, in descending score order.
    """
    neg_desc = np.asarray(neg_hist, dtype=np.int64)[::-1]
    pos_desc = np.asarray(pos_hist, dtype=np.int64)[::-1]
    neg_ge = np.cumsum(neg_desc)
    keep = pos_desc > 0
    weight = None
    if region_hist is not None:
        weight = np.asarray(region_hist, dtype=np.float64)[::-1][keep]
    return RankSummary(
        pos=pos_desc[keep],
        neg_ge=neg_ge[keep],
        neg_gt=(neg_ge - neg_desc)[keep],
        n_pos=int(pos_desc.sum()),
        n_neg=int(neg_desc.sum()),
        region_weight=weight,
        n_regions=n_regions,
    )


def _single_class_reason(s: RankSummary) -> str | None:
    if s.n_pos == 0 and s.n_neg == 0:
        return "no samples"
    if s.n_pos == 0:
        return "no positive (anomalous) sample"
    if s.n_neg == 0:
        return "no negative (normal) sample"
    return None


def auroc_from_summary(s: RankSummary, name: str = "AUROC") -> float:
    """Area under the ROC curve, ties counted half (equal to sklearn ``roc_auc_score``)."""
    reason = _single_class_reason(s)
    if reason is not None:
        return undefined(name, reason)
    below = s.n_neg - s.neg_ge
    tied = s.neg_ge - s.neg_gt
    # 2*U as an exact integer: every positive beats the negatives below it, ties count 1/2.
    twice_u = int(np.sum(s.pos * (2 * below + tied)))
    return twice_u / (2.0 * s.n_pos * s.n_neg)


def ap_from_summary(s: RankSummary, name: str = "AP") -> float:
    """Step average precision ``sum_n (R_n - R_{n-1}) P_n`` (sklearn ``average_precision_score``)."""
    reason = _single_class_reason(s)
    if reason is not None:
        return undefined(name, reason)
    tps = np.cumsum(s.pos)
    precision = tps / (tps + s.neg_ge)
    return float(np.sum(s.pos * precision) / s.n_pos)


def aupr_from_summary(s: RankSummary, name: str = "AUPR") -> float:
    """Trapezoidal area under (recall, precision), as sklearn ``auc(recall, precision)``.

    The curve starts at (recall 0, precision 1) like sklearn's ``precision_recall_curve``;
    the point just above a positive group is (previous recall, precision with the
    negatives strictly above the group), with precision 0 when no positive is above yet.
    """
    reason = _single_class_reason(s)
    if reason is not None:
        return undefined(name, reason)
    tps = np.cumsum(s.pos)
    recall = tps / s.n_pos
    precision = tps / (tps + s.neg_ge)
    tps_prev = np.concatenate(([0], tps[:-1]))
    denom_prev = tps_prev + s.neg_gt
    precision_prev = np.ones_like(precision)
    np.divide(tps_prev, denom_prev, out=precision_prev, where=denom_prev > 0)
    recall_prev = np.concatenate(([0.0], recall[:-1]))
    return float(np.sum((recall - recall_prev) * (precision + precision_prev)) / 2.0)


def f1max_from_summary(s: RankSummary, name: str = "F1-max") -> float:
    """Largest F1 over all thresholds of the exact PR curve (``2TP / (TP + FP + P)``)."""
    reason = _single_class_reason(s)
    if reason is not None:
        return undefined(name, reason)
    tps = np.cumsum(s.pos)
    f1 = 2.0 * tps / (s.n_pos + tps + s.neg_ge)
    return float(np.max(f1))


def clipped_trapezoid(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of a polyline with non-decreasing ``x`` over ``[x[0], limit]``.

    The segment that crosses ``limit`` is cut there with linear interpolation.

    Args:
        x: (M,) non-decreasing abscissae.
        y: (M,) ordinates.
        limit: upper integration bound.
    """
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    full = x1 <= limit
    area = float(np.sum((x1[full] - x0[full]) * (y0[full] + y1[full])) / 2.0)
    cross = np.flatnonzero((x0 < limit) & (x1 > limit))
    if cross.size:
        i = int(cross[0])
        y_at = y0[i] + (y1[i] - y0[i]) * (limit - x0[i]) / (x1[i] - x0[i])
        area += (limit - x0[i]) * (y0[i] + y_at) / 2.0
    return area


def aupro_from_summary(s: RankSummary, fpr_limit: float = 0.3, name: str = "AUPRO") -> float:
    """Exact normalised area under the PRO-vs-FPR curve up to ``fpr_limit``.

    PRO(t) is the mean over the K regions of the fraction of the region scoring >= t;
    FPR(t) the fraction of negatives scoring >= t. The curve through every distinct
    threshold (tied scores give one diagonal step) is integrated with the trapezoidal rule
    from FPR 0 to ``fpr_limit``, interpolating linearly at the limit, then divided by it.

    The curve is the polyline ``(0, 0)``, then per group j (descending score) a horizontal
    step at PRO_{j-1} to ``(neg_gt_j / N, PRO_{j-1})`` and a diagonal to
    ``(neg_ge_j / N, PRO_j)``, and a last horizontal step to ``(1, PRO_last)``. Its segments
    are summed in closed form (the x values only grow, so the segments inside the limit are
    a prefix of each kind), with no interleaved copy of the curve: this is
    :func:`clipped_trapezoid` of that polyline, in O(J) passes over the J groups.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if s.region_weight is None:
        raise ValueError("AUPRO needs per-region weights; the summary was built without them")
    if s.n_regions == 0:
        return undefined(name, "no anomalous region in the ground-truth masks")
    if s.n_neg == 0:
        return undefined(name, "no normal pixel")
    limit = float(fpr_limit)
    pro = np.cumsum(s.region_weight) / s.n_regions
    x_gt = s.neg_gt / s.n_neg  # start of group j's diagonal
    x_ge = s.neg_ge / s.n_neg  # its end
    j = pro.size
    # horizontal steps h = 0..j: from x_ge[h-1] (0 for h = 0) to x_gt[h] (1 for h = j) at
    # PRO_{h-1} (0 for h = 0); diagonals d = 0..j-1: from x_gt[d] to x_ge[d].
    n_h = int(np.searchsorted(x_gt, limit, side="right")) + (1 if limit >= 1.0 else 0)
    n_d = int(np.searchsorted(x_ge, limit, side="right"))
    area = 0.0
    if n_h > 1:  # step 0 lies at PRO 0 and adds nothing
        k = min(n_h, j) - 1  # steps 1..k end at x_gt[1..k]; step j ends at 1
        area += float(np.dot(x_gt[1 : k + 1] - x_ge[:k], pro[:k]))
        if n_h == j + 1 and j:
            area += (1.0 - float(x_ge[j - 1])) * float(pro[j - 1])
    if n_d:
        pro_prev = np.concatenate(([0.0], pro[: n_d - 1]))
        area += float(np.dot(x_ge[:n_d] - x_gt[:n_d], pro_prev + pro[:n_d])) / 2.0
    # the one segment that crosses the limit, if any: step n_h or diagonal n_d
    if n_h <= j:
        x0 = float(x_ge[n_h - 1]) if n_h else 0.0
        x1 = float(x_gt[n_h]) if n_h < j else 1.0
        if x0 < limit < x1:
            y = float(pro[n_h - 1]) if n_h else 0.0
            area += (limit - x0) * y
    if n_d < j:
        x0, x1 = float(x_gt[n_d]), float(x_ge[n_d])
        if x0 < limit < x1:
            y0 = float(pro[n_d - 1]) if n_d else 0.0
            y1 = float(pro[n_d])
            y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_at) / 2.0
    return area / limit


def _aupro_polyline(s: RankSummary, fpr_limit: float) -> float:
    """Reference AUPRO: the interleaved polyline through :func:`clipped_trapezoid` (tests)."""
    assert s.region_weight is not None
    pro = np.cumsum(s.region_weight) / s.n_regions
    j = pro.size
    x = np.empty(2 * j + 2)
    y = np.empty(2 * j + 2)
    x[0] = y[0] = 0.0
    x[1:-1:2] = s.neg_gt / s.n_neg
    x[2:-1:2] = s.neg_ge / s.n_neg
    x[-1] = 1.0
    y[1] = 0.0
    y[3:-1:2] = pro[:-1]
    y[2:-1:2] = pro
    y[-1] = pro[-1]
    return clipped_trapezoid(x, y, fpr_limit) / fpr_limit


def binning_error_bounds(s: RankSummary, fpr_limit: float = 0.3) -> dict[str, float]:
    """Guaranteed bounds on |binned - exact| when every group of ``s`` is one bin.

    Inside a bin the true order of its samples is unknown; each bound is the largest change
    any order could make: AUROC ``sum_b pos_b neg_b / (2PN)``; step AP from the best and
    worst precision a positive of bin b can have; F1-max from the best F1 reachable inside a
    bin (the binned value is a lower bound); AUPRO ``sum_b dFPR_b dPRO_b / 2`` (the curve
    inside a bin is a monotone staircase, the binned one its diagonal), divided by the limit.

    Returns:
        ``pixel_auroc``, ``pixel_ap``, ``pixel_f1max``, ``pixel_aupro`` bounds (NaN when the
        metric is undefined).
    """
    keys = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
    if s.n_pos == 0 or s.n_neg == 0:
        return dict.fromkeys(keys, float("nan"))
    p, n = s.n_pos, s.n_neg
    tps = np.cumsum(s.pos)
    t_prev = tps - s.pos
    auroc_bound = float(np.sum(s.pos * (s.neg_ge - s.neg_gt))) / (2.0 * p * n)
    ap = np.sum(s.pos * tps / (tps + s.neg_ge)) / p
    ap_hi = np.sum(s.pos * tps / (tps + s.neg_gt)) / p
    ap_lo = np.sum(s.pos * (t_prev + 1) / (t_prev + 1 + s.neg_ge)) / p
    f1 = np.max(2.0 * tps / (p + tps + s.neg_ge))
    f1_hi = np.max(2.0 * tps / (p + tps + s.neg_gt))
    out = {
        "pixel_auroc": auroc_bound,
        "pixel_ap": float(max(ap_hi - ap, ap - ap_lo)),
        "pixel_f1max": float(f1_hi - f1),
        "pixel_aupro": float("nan"),
    }
    if s.region_weight is not None and s.n_regions:
        x0, x1 = s.neg_gt / n, s.neg_ge / n
        dy = s.region_weight / s.n_regions
        width = np.clip(np.minimum(x1, fpr_limit) - x0, 0.0, None)
        full = x1 <= fpr_limit
        bound = np.where(full, width * dy / 2.0, width * dy)
        out["pixel_aupro"] = float(np.sum(bound) / fpr_limit)
    return out
