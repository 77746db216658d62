"""Benchmark outputs people look at: per-image scores, plots, metrics at the no-label threshold."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.benchmark.plots import pr_curve, roc_curve
from anomalens.benchmark.runner import BenchmarkConfig, run_benchmark, threshold_metrics
from anomalens.data.io import load_image
from anomalens.registry import create_detector
from anomalens.thresholds import calibrate_leave_one_out, fixed_threshold


def test_roc_and_pr_curves_match_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is a dev dependency")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels, 1.0), 1)  # rounded: ties included
    fpr, tpr = roc_curve(scores, labels)
    ref_fpr, ref_tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    rec, prec = pr_curve(scores, labels)
    ref_p, ref_r, _ = metrics.precision_recall_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(rec, ref_r[:-1][::-1])
    np.testing.assert_allclose(prec, ref_p[:-1][::-1])


def _rows(scores, labels, types):
    return [
        {"path": f"{i}.png", "score": s, "label": y, "defect_type": t}
        for i, (s, y, t) in enumerate(zip(scores, labels, types))
    ]


def test_metrics_at_the_threshold_count_what_it_flags() -> None:
    # normals 0.1 0.2 0.6 | crack 0.7 0.9 | hole 0.3 0.8; threshold 0.5
    rows = _rows(
        [0.1, 0.2, 0.6, 0.7, 0.9, 0.3, 0.8],
        [0, 0, 0, 1, 1, 1, 1],
        ["good", "good", "good", "crack", "crack", "hole", "hole"],
    )
    m = threshold_metrics(rows, fixed_threshold(0.5))
    # flagged: 0.6 (FP), 0.7, 0.9, 0.8 (TP); missed 0.3
    assert m["thr_precision"] == pytest.approx(3 / 4)
    assert m["thr_recall"] == pytest.approx(3 / 4)
    assert m["thr_f1"] == pytest.approx(3 / 4)
    assert m["thr_false_alarm_rate"] == pytest.approx(1 / 3)
    assert [r["decision"] for r in rows] == ["normal"] * 2 + ["anomalous"] * 3 + [
        "normal",
        "anomalous",
    ]
    assert m["per_defect"]["crack"] == {"n": 2, "image_auroc": 1.0, "recall_at_threshold": 1.0}
    assert m["per_defect"]["hole"]["recall_at_threshold"] == 0.5
    assert m["per_defect"]["hole"]["image_auroc"] == pytest.approx(5 / 6)  # 5 of 6 pairs

    none = threshold_metrics(_rows([0.1, 0.9], [0, 1], ["good", "x"]), None, "needs 2 shots")
    assert none["threshold_note"] == "needs 2 shots" and math.isnan(none["thr_f1"])
    flags_nothing = threshold_metrics(_rows([0.1, 0.9], [0, 1], ["good", "x"]), fixed_threshold(5))
    assert flags_nothing["thr_f1"] == 0.0 and flags_nothing["thr_false_alarm_rate"] == 0.0
    assert math.isnan(flags_nothing["thr_precision"])


def test_benchmark_writes_scores_plots_and_threshold_metrics(
    synthetic_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    cfg = BenchmarkConfig(
        method="toy",
        dataset="mvtec",
        root=str(synthetic_root),
        out=str(out),
        shots=[1, 3],
        seeds=[0, 1],
    )
    rows = run_benchmark(cfg, progress=False)
    cats = sorted({r["category"] for r in rows})
    for r in rows:
        scores = list(csv.DictReader(open(out / r["scores_file"])))
        assert len(scores) == r["num_test_images"]
        if r["k"] == 1:  # a few-shot method cannot leave one out of one shot
            assert "at least 2" in r["threshold_note"] and math.isnan(r["thr_f1"])
            assert {s["decision"] for s in scores} == {""}
            continue
        assert r["threshold_method"] == "leave-one-out"
        # the very threshold predict would set from these shots
        shots = [load_image(p) for p in r["shots"]]
        ref = calibrate_leave_one_out(lambda: create_detector("toy"), shots, category=r["category"])
        assert r["threshold"] == pytest.approx(ref.value)
        flagged = [float(s["score"]) > r["threshold"] for s in scores]
        assert [s["decision"] == "anomalous" for s in scores] == flagged
        normals = [f for f, s in zip(flagged, scores) if s["label"] == "0"]
        assert r["thr_false_alarm_rate"] == pytest.approx(sum(normals) / len(normals))
        assert set(r["per_defect"]) == {s["defect_type"] for s in scores if s["label"] == "1"}
    header = next(csv.reader(open(out / "results.csv")))
    assert {"thr_precision", "thr_recall", "thr_f1", "thr_false_alarm_rate"} <= set(header)
    md = (out / "results.md").read_text()
    assert "At the no-label threshold" in md and "| precision | recall | F1 | false alarms |" in md
    for cat in cats:
        for k in (1, 3):
            png = out / "plots" / f"{cat}_k{k}.png"
            assert f"(plots/{cat}_k{k}.png)" in md
            with Image.open(png) as im:
                assert im.format == "PNG" and im.size[0] > 500
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert all("thr_f1" in s for s in summary)
    # a rerun recomputes nothing and rebuilds the same tables
    assert (
        run_benchmark(cfg, progress=False) == json.loads((out / "results.json").read_text())["runs"]
    )


def test_batch_methods_are_judged_by_the_batch_robust_rule_on_the_test_scores() -> None:
    scores = [1.0, 1.1, 0.9, 1.05, 0.95, 5.0]
    rows = _rows(scores, [0, 0, 0, 0, 0, 1], ["good"] * 5 + ["hole"])
    m = threshold_metrics(rows, None, "batch")
    assert m["threshold_method"] == "batch-robust" and m["threshold_note"] == ""
    assert 1.1 < m["threshold"] < 5.0
    assert m["thr_recall"] == 1.0 and m["thr_false_alarm_rate"] == 0.0
