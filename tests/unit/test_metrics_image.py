"""Image-level / generic ranking metrics against scikit-learn, ties and undefined cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from anomalens.metrics import (
    UndefinedMetricWarning,
    aupr_trapezoid,
    auroc,
    average_precision,
    f1_max,
    image_metrics,
)


def _sklearn_all(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "image_auroc": skm.roc_auc_score(labels, scores),
        "image_ap": skm.average_precision_score(labels, scores),
        "image_aupr": skm.auc(recall, precision),
        "image_f1max": float(np.max(f1[np.isfinite(f1)])),
    }


def _random_case(rng: np.random.Generator, case: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(2, 80))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[0], labels[1] = True, False  # both classes present
    kind = case % 3
    if kind == 0:  # continuous, shifted for positives
        scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    elif kind == 1:  # heavy ties: a handful of levels
        scores = rng.integers(0, int(rng.integers(1, 5)), size=n).astype(float)
    else:  # raw distances with large values and duplicates
        scores = np.round(rng.gamma(2.0, 50.0, size=n) + 30 * labels, 0)
    return scores.astype(np.float32), labels


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_random_and_tied(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for case in range(60):
        scores, labels = _random_case(rng, case)
        ours = image_metrics(scores, labels)
        ref = _sklearn_all(scores, labels)
        for key, value in ref.items():
            assert ours[key] == pytest.approx(value, abs=1e-6), (key, case, scores, labels)


def test_single_functions_equal_dict() -> None:
    rng = np.random.default_rng(7)
    scores, labels = rng.random(50), rng.random(50) < 0.4
    d = image_metrics(scores, labels)
    assert auroc(scores, labels) == d["image_auroc"]
    assert average_precision(scores, labels) == d["image_ap"]
    assert aupr_trapezoid(scores, labels) == d["image_aupr"]
    assert f1_max(scores, labels) == d["image_f1max"]


def test_all_equal_scores() -> None:
    labels = np.array([0, 1, 0, 1, 1, 0, 0])
    scores = np.full(labels.shape, 3.5, dtype=np.float32)
    out = image_metrics(scores, labels)
    assert out["image_auroc"] == 0.5
    assert out["image_ap"] == pytest.approx(3 / 7)
    assert out == pytest.approx(_sklearn_all(scores, labels))


def test_perfect_and_inverted_ranking() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    perfect = image_metrics(scores, labels)
    assert perfect == {"image_auroc": 1.0, "image_ap": 1.0, "image_aupr": 1.0, "image_f1max": 1.0}
    assert auroc(-scores, labels) == 0.0


def test_large_tied_input_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(200_000) < 0.03
    scores = (np.round(rng.normal(size=labels.size) + 1.5 * labels, 2)).astype(np.float32)
    ours = image_metrics(scores, labels)
    ref = _sklearn_all(scores, labels)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("labels", [np.zeros(6, bool), np.ones(6, bool)])
def test_single_class_is_nan_with_warning(labels: np.ndarray) -> None:
    scores = np.arange(6, dtype=np.float32)
    with pytest.warns(UndefinedMetricWarning, match="undefined"):
        out = image_metrics(scores, labels)
    assert all(np.isnan(v) for v in out.values())
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(auroc(scores, labels))


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="same size"):
        auroc(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="numeric"):
        auroc(np.array(["a", "b"]), np.array([0, 1]))


def test_float64_scores_are_not_quantised() -> None:
    # Differences below float32 resolution must still rank correctly.
    scores = np.array([1.0, 1.0 + 1e-12, 1.0 + 2e-12])
    labels = np.array([0, 0, 1])
    assert auroc(scores, labels) == 1.0
