"""Exact, tie-aware binary ranking metrics on score arrays (image level and generic).

All functions take scores (higher = more anomalous) and labels (True / >0 = anomalous) of
any shape; both are flattened. Results equal scikit-learn's ``roc_auc_score``,
``average_precision_score`` and ``auc(recall, precision)`` of ``precision_recall_curve``
within float rounding, ties included. A single-class input gives NaN and an
:class:`~anomalens.metrics._curves.UndefinedMetricWarning`, never 0.
"""

from __future__ import annotations

import numpy as np

from anomalens.metrics._curves import (
    RankSummary,
    ap_from_summary,
    aupr_from_summary,
    auroc_from_summary,
    f1max_from_summary,
    summary_from_sorted,
)

__all__ = [
    "aupr_trapezoid",
    "auroc",
    "average_precision",
    "f1_max",
    "image_metrics",
    "rank_summary",
]


def as_scores(scores: np.ndarray, what: str = "scores", check_nan: bool = True) -> np.ndarray:
    """Return ``scores`` as a float array of at least float32 precision (no quantisation).

    Raises:
        ValueError: when a score is NaN (checked only if ``check_nan``).
    """
    arr = np.asarray(scores)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} must be a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.result_type(arr.dtype, np.float32), copy=False)
    if check_nan and np.isnan(arr).any():
        raise ValueError(f"{what} contain NaN; replace them before computing metrics")
    return arr


def as_labels(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    """Return ``labels`` as a bool array (bool kept, numbers ``> 0`` are anomalous)."""
    arr = np.asarray(labels)
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} must be bool or numeric, got dtype {arr.dtype}")
    return arr > 0


def rank_summary(scores: np.ndarray, labels: np.ndarray) -> RankSummary:
    """Exact tie-aware summary of ``scores`` split by ``labels`` (see ``_curves``).

    Args:
        scores: (...) scores, higher = more anomalous.
        labels: (...) same shape, True / >0 = anomalous.
    """
    s = as_scores(scores).reshape(-1)
    y = as_labels(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(
            f"scores and labels must have the same size, got {np.shape(scores)} and "
            f"{np.shape(labels)}"
        )
    neg = np.sort(s[~y])
    values, counts = np.unique(s[y], return_counts=True)
    return summary_from_sorted(neg, values, counts)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; tied scores form one diagonal step (Mann-Whitney U)."""
    return auroc_from_summary(rank_summary(scores, labels))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step average precision ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds."""
    return ap_from_summary(rank_summary(scores, labels))


def aupr_trapezoid(scores: np.ndarray, labels: np.ndarray) -> float:
    """Trapezoidal area under the exact precision-recall curve (anomalib ``AUPR``)."""
    return aupr_from_summary(rank_summary(scores, labels))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Largest F1 over every distinct threshold of the exact PR curve."""
    return f1max_from_summary(rank_summary(scores, labels))


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image-level metrics of one category.

    Args:
        scores: (N,) image scores, higher = more anomalous (raw, never sigmoid-ed).
        labels: (N,) True / 1 = anomalous image.

    Returns:
        ``image_auroc``, ``image_ap`` (step AP), ``image_aupr`` (trapezoid) and
        ``image_f1max``; all NaN (with a warning) when the category has a single class.
    """
    s = rank_summary(scores, labels)
    return {
        "image_auroc": auroc_from_summary(s, "image AUROC"),
        "image_ap": ap_from_summary(s, "image AP"),
        "image_aupr": aupr_from_summary(s, "image AUPR"),
        "image_f1max": f1max_from_summary(s, "image F1-max"),
    }
