"""Benchmark plots: ROC and PR curves, score histograms and per-defect-type metrics (PNG).

One figure per (category, k) from the per-image score files the runner writes
(``scores/<category>/<job>.csv``): ROC and PR curves of every seed, the score histogram of
normal vs defective test images with the no-label threshold of one seed, and per defect type
the image AUROC (that type against the normal images) and the recall at the threshold, averaged
over seeds. Drawn with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["pr_curve", "read_scores", "roc_curve", "write_category_plot"]


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score, starting at (0, 0).

    Args:
        scores: (N,) image scores, higher = more anomalous.
        labels: (N,) 1 for defective, 0 for normal (both must occur).

    Returns:
        (fpr, tpr), each (J + 1,) with J the number of distinct scores.
    """
    tp, fp = _cumulative(scores, labels)
    return fp / max(fp[-1], 1), tp / max(tp[-1], 1)


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision at every distinct score (highest score first).

    Returns:
        (recall, precision), each (J,).
    """
    tp, fp = _cumulative(scores, labels)
    tp, fp = tp[1:], fp[1:]
    return tp / max(tp[-1], 1), tp / np.maximum(tp + fp, 1)


def _cumulative(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (TP, FP) counts for thresholds at the distinct scores, descending, from 0."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each tie group
    tp = np.r_[0, np.cumsum(y)[last]].astype(np.float64)
    fp = np.r_[0, np.cumsum(~y)[last]].astype(np.float64)
    return tp, fp


def read_scores(path: Path) -> dict[str, np.ndarray]:
    """A per-image score file as arrays: ``score``, ``label``, ``defect_type``."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {
        "score": np.asarray([float(r["score"]) for r in rows], dtype=np.float64),
        "label": np.asarray([int(r["label"]) for r in rows], dtype=np.int64),
        "defect_type": np.asarray([r["defect_type"] for r in rows], dtype=object),
    }


def safe_name(text: str) -> str:
    """``text`` as a file-name part: letters, digits, ``-``, ``_`` and ``.`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "_"


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def write_category_plot(
    path: Path,
    category: str,
    k: int,
    jobs: Sequence[tuple[dict[str, Any], dict[str, np.ndarray]]],
) -> bool:
    """Draw one category's figure for one k; False (nothing written) when no job has scores.

    Args:
        path: PNG file to write (atomically).
        category: category name (title).
        k: number of shots (title).
        jobs: (job row, its per-image scores) per seed; the row gives ``seed``, ``threshold``,
            ``image_auroc`` and ``per_defect``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from anomalens.fileio import atomic_write_bytes

    jobs = [(r, s) for r, s in jobs if s["score"].size and len(set(s["label"].tolist())) == 2]
    if not jobs:
        return False
    fig = Figure(figsize=(12, 9), dpi=90)
    FigureCanvasAgg(fig)
    (ax_roc, ax_pr), (ax_hist, ax_def) = fig.subplots(2, 2)
    for row, sc in jobs:
        seed = "zero-shot" if row.get("seed") is None else f"seed {row['seed']}"
        auroc = _finite(row.get("image_auroc"))
        fpr, tpr = roc_curve(sc["score"], sc["label"])
        ax_roc.plot(fpr, tpr, label=f"{seed}" + (f" (AUROC {100 * auroc:.1f})" if auroc else ""))
        rec, prec = pr_curve(sc["score"], sc["label"])
        ap = _finite(row.get("image_ap"))
        ax_pr.step(
            rec, prec, where="post", label=f"{seed}" + (f" (AP {100 * ap:.1f})" if ap else "")
        )
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax_roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (images)")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (images)")
    for ax in (ax_roc, ax_pr):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")

    row, sc = jobs[0]
    seed = "zero-shot" if row.get("seed") is None else f"seed {row['seed']}"
    good, bad = sc["score"][sc["label"] == 0], sc["score"][sc["label"] == 1]
    bins = np.histogram_bin_edges(sc["score"], bins=30)
    ax_hist.hist(good, bins=bins, alpha=0.6, color="#27ae60", label=f"normal ({good.size})")
    ax_hist.hist(bad, bins=bins, alpha=0.6, color="#c0392b", label=f"defective ({bad.size})")
    thr = _finite(row.get("threshold"))
    if thr is not None:
        ax_hist.axvline(thr, color="black", linestyle="--", label=f"no-label threshold {thr:.4g}")
    ax_hist.set(xlabel="image score", ylabel="images", title=f"score histogram ({seed})")
    ax_hist.legend(fontsize=8)

    types = sorted({t for r, _ in jobs for t in (r.get("per_defect") or {})})
    if types:
        x = np.arange(len(types))
        au = [
            _mean([(r.get("per_defect") or {}).get(t, {}).get("image_auroc") for r, _ in jobs])
            for t in types
        ]
        rc = [
            _mean(
                [(r.get("per_defect") or {}).get(t, {}).get("recall_at_threshold") for r, _ in jobs]
            )
            for t in types
        ]
        ax_def.bar(x - 0.2, [100 * v if v is not None else 0 for v in au], 0.4, label="I-AUROC")
        ax_def.bar(
            x + 0.2, [100 * v if v is not None else 0 for v in rc], 0.4, label="recall at threshold"
        )
        ax_def.set_xticks(x, types, rotation=30, ha="right", fontsize=8)
        ax_def.set_ylim(0, 105)
        ax_def.legend(fontsize=8)
    ax_def.set(ylabel="%", title="per defect type (vs normal images, mean over seeds)")
    fig.suptitle(f"{category}, k = {k}" + (" (zero-shot)" if k == 0 else ""))
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True


def _mean(values: Sequence[Any]) -> float | None:
    v = [x for x in (_finite(y) for y in values) if x is not None]
    return float(np.mean(v)) if v else None
