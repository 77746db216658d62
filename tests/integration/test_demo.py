"""The offline demo runs end to end and produces a report with overlays."""

from __future__ import annotations

import json

from anomalens.demo import pick_demo_weights, run_demo


def test_demo_end_to_end_small(tmp_path, capsys):
    # a benchmark left by an earlier demo with other weights is redone, not mixed in
    stale = tmp_path / "benchmark" / "jobs" / "washer" / "k1_seed0.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    old = {"method": "patchcore", "dataset": "mvtec", "root": str(tmp_path / "data")}
    old.update(draw_rule="without_replacement", pixel_mode="exact", max_test_images=None)
    old["method_kwargs"] = {"backbone": "mobilenet_v2", "weights": "old.pth"}
    (tmp_path / "benchmark" / "config.json").write_text(json.dumps(old))
    index = run_demo(
        tmp_path, weights="random", progress=False, categories=["washer"], image_size=64
    )
    assert index.is_file()
    report = tmp_path / "inspect" / "washer" / "report.html"
    assert report.is_file() and "anomalous" in report.read_text()
    assert len(list((tmp_path / "inspect" / "washer" / "overlays").glob("*.png"))) == 16
    assert (tmp_path / "benchmark" / "results.md").is_file()
    assert json.loads(stale.read_text())["detector"]["weights"] == "random"
    assert "I-AUROC" in capsys.readouterr().out


def test_demo_weight_choice(monkeypatch, tmp_path):
    # the preset is never guessed from a file name: it is given, or the torchvision default
    weights = str(tmp_path / "mobilenet_v2_imagenet_int8dequant.safetensors")
    monkeypatch.setenv("ANOMALENS_DEMO_WEIGHTS", weights)
    monkeypatch.delenv("ANOMALENS_DEMO_BACKBONE", raising=False)
    backbone, chosen, origin = pick_demo_weights(None)
    assert (backbone, chosen) == ("mobilenet_v2", weights) and "ANOMALENS_DEMO_WEIGHTS" in origin
    monkeypatch.setenv("ANOMALENS_DEMO_BACKBONE", "mobilenet_v2_tf")
    assert pick_demo_weights(None)[0] == "mobilenet_v2_tf"
    assert pick_demo_weights("x.pth", "mobilenet_v2")[:2] == ("mobilenet_v2", "x.pth")
