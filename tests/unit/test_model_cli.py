"""Fit once, predict many times: ``anomalens fit`` -> ``predict --model`` (no refit), the
pipeline's fitted-detector entry point, per-group models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.cli.main import main
from anomalens.model_file import MODEL_JSON, load_model
from anomalens.pipeline import ThresholdSpec, fit_model, load_model_for_predict, run_predict
from anomalens.registry import create_detector

PATCHCORE = ["--method", "patchcore", "--backbone", "resnet18", "--weights", "random"]
PATCHCORE += ["--image-size", "64"]


def _write(folder: Path, name: str, arr: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    Image.fromarray(arr).save(p)
    return p


def _good(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(100, 130, size=(64, 64, 3), dtype=np.uint8)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    good, incoming = tmp_path / "good", tmp_path / "incoming"
    for i in range(3):
        _write(good, f"g{i}.png", _good(rng))
        _write(incoming, f"ok{i}.png", _good(rng))
    bad = _good(rng)
    bad[20:40, 20:40] = 255
    _write(incoming, "defect.png", bad)
    return good, incoming


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


def test_fit_then_predict_with_the_model_matches_a_fresh_run(folders, tmp_path, capsys):
    good, incoming = folders
    model = tmp_path / "model"
    assert main(["fit", *PATCHCORE, "--normal", str(good), "--out", str(model)]) == 0
    assert "fitted on 3 normal image(s)" in capsys.readouterr().out
    info = json.loads((model / MODEL_JSON).read_text())
    assert info["threshold"]["method"] == "leave-one-out" and info["num_shots"] == 3
    r_model, r_fresh = tmp_path / "r_model", tmp_path / "r_fresh"
    args = ["--images", str(incoming), "-q"]
    assert main(["predict", "--model", str(model), *args, "--out", str(r_model)]) == 0
    assert main(["predict", *PATCHCORE, "--normal", str(good), *args, "--out", str(r_fresh)]) == 0
    a, b = _rows(r_model), _rows(r_fresh)
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:  # same scores, decisions and threshold as fitting in the same run
        assert a[name]["score"] == b[name]["score"]
        assert a[name]["decision"] == b[name]["decision"]
        assert a[name]["threshold"] == b[name]["threshold"]
    assert a["defect.png"]["decision"] == "anomalous"
    assert (r_model / "masks").is_dir() and (r_model / "report.html").is_file()


def test_predict_with_a_model_refuses_fit_flags(folders, tmp_path, capsys):
    good, incoming = folders
    model = tmp_path / "m.anomalens"
    assert main(["fit", *PATCHCORE, "--normal", str(good), "--out", str(model)]) == 0
    with pytest.raises(SystemExit, match="--normal cannot be used with --model"):
        argv = ["predict", "--model", str(model), "--normal", str(good)]
        main([*argv, "--images", str(incoming), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="single model: drop --groups"):
        argv = ["predict", "--model", str(model), "--groups", "--images", str(incoming)]
        main([*argv, "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="give --method"):
        main(["predict", "--images", str(incoming), "--out", str(tmp_path / "r")])
    broken = tmp_path / "broken.anomalens"
    broken.write_bytes(model.read_bytes()[:300])
    rc = main(["predict", "--model", str(broken), "--images", str(incoming), "--out", "r"])
    assert rc == 1 and "corrupt or truncated" in capsys.readouterr().err


def test_a_fixed_threshold_or_calibration_overrides_the_saved_one(folders, tmp_path):
    good, incoming = folders
    make = lambda: create_detector(  # noqa: E731
        "patchcore", backbone="resnet18", weights="random", image_size=64
    )
    fitted = fit_model(make, sorted(good.iterdir()), tmp_path / "m")
    assert fitted.threshold is not None and fitted.threshold.method == "leave-one-out"
    det, thr = load_model_for_predict(fitted.path)
    assert thr is not None and thr.to_dict() == fitted.threshold.to_dict()
    s = run_predict(
        None,
        sorted(incoming.iterdir()),
        tmp_path / "r",
        detector=det,
        model_threshold=thr,
        threshold=ThresholdSpec(fixed=1e9),
        progress=False,
    )
    assert s.threshold.method == "fixed" and s.num_anomalous == 0
    with pytest.raises(ValueError, match="already fitted"):
        run_predict(
            None,
            sorted(incoming.iterdir()),
            tmp_path / "r2",
            detector=det,
            normal_paths=sorted(good.iterdir()),
        )


def test_fit_groups_writes_one_model_per_group(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for group, level in (("dark", 40), ("light", 200)):
        for i in range(2):
            im = np.clip(_good(rng).astype(int) - 115 + level, 0, 255).astype(np.uint8)
            _write(tmp_path / "good" / group, f"g{i}.png", im)
            _write(tmp_path / "incoming" / group, f"x{i}.png", im)
    models = tmp_path / "models"
    argv = ["fit", *PATCHCORE, "--normal", str(tmp_path / "good"), "--groups"]
    assert main([*argv, "--out", str(models)]) == 0
    assert sorted(p.name for p in models.iterdir()) == ["dark", "light"]
    dark = load_model(models / "dark")
    light = load_model(models / "light")
    assert not np.array_equal(dark.detector.memory_bank.numpy(), light.detector.memory_bank.numpy())
    out = tmp_path / "r"
    argv = ["predict", "--model", str(models), "--groups", "--images", str(tmp_path / "incoming")]
    assert main([*argv, "--out", str(out), "-q"]) == 0
    assert (out / "dark" / "results.csv").is_file() and (out / "index.html").is_file()
    (tmp_path / "incoming" / "other").mkdir()
    _write(tmp_path / "incoming" / "other", "y.png", _good(rng))
    assert main([*argv, "--out", str(tmp_path / "r2"), "-q"]) == 1
    assert "no model for group(s) other" in capsys.readouterr().err
    assert not (tmp_path / "r2" / "dark").exists()  # refused before anything is computed


def test_fit_help_and_predict_help_explain_model_files(capsys):
    for cmd, flags in (
        ("fit", ("--normal", "--out", "--calibration", "--embed-weights", "--groups")),
        ("predict", ("--model",)),
    ):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(f in out for f in flags)
