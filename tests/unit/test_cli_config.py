"""``--config FILE``: a run described by a YAML or JSON file, flags override, unknown keys
refused with the file and key named, the resolved settings written back into run.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomalens.cli.main import main


@pytest.fixture
def folders(synthetic_root: Path) -> tuple[Path, Path]:
    cat = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    return cat / "train" / "good", cat / "test" / "good"


def _scores(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [r["score"] for r in sorted(rows, key=lambda r: r["path"])]


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_json_config_runs_predict_and_is_recorded(folders, tmp_path, capsys):
    normal, images = folders
    out = tmp_path / "out"
    cfg = _write(
        tmp_path / "run.json",
        {
            "method": "toy",
            "normal": str(normal),
            "images": str(images),
            "out": str(out),
            "batch-size": 2,
            "no_overlays": True,
            "option": {"offset": 0.25},
        },
    )
    assert main(["predict", "--config", str(cfg), "-q"]) == 0
    run = json.loads((out / "run.json").read_text())
    values = run["config"]["values"]
    assert run["config"]["file"] == str(cfg)
    assert values["method"] == "toy" and values["batch_size"] == 2 and values["no_overlays"]
    assert values["option"] == ["offset=0.25"] and values["quiet"] is True
    assert min(_scores(out)) >= 0.25  # the toy detector adds its offset to every score
    assert not (out / "overlays").exists() or not any((out / "overlays").iterdir())


def test_flags_override_the_file_and_options_add_up(folders, tmp_path):
    normal, images = folders
    cfg = _write(
        tmp_path / "c.json",
        {"method": "toy", "normal": str(normal), "images": str(images), "batch_size": 2,
         "option": ["offset=0.5"], "out": str(tmp_path / "from_file")},
    )  # fmt: skip
    out = tmp_path / "from_flag"
    argv = ["predict", "--batch-size", "3", "--config", str(cfg), "--out", str(out), "-q"]
    assert main([*argv, "--option", "offset=0.125"]) == 0
    assert not (tmp_path / "from_file").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["values"]["batch_size"] == 3
    assert run["config"]["values"]["option"] == ["offset=0.5", "offset=0.125"]
    # the command line's offset, given last, wins over the file's
    assert main([*argv[:5], "--out", str(tmp_path / "file_only"), "-q"]) == 0
    diffs = [a - b for a, b in zip(_scores(tmp_path / "file_only"), _scores(out))]
    assert diffs and all(d == pytest.approx(0.375) for d in diffs)


def test_recorded_config_reruns_the_same_run(folders, tmp_path):
    normal, images = folders
    out = tmp_path / "out"
    argv = ["predict", "--method", "toy", "--normal", str(normal), "--images", str(images),
            "--out", str(out), "--threshold", "0.2", "-q"]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((out / "run.json").read_text())
    cfg = _write(tmp_path / "again.json", first["config"]["values"])
    assert main(["predict", "--config", str(cfg)]) == 0
    second = json.loads((out / "run.json").read_text())
    assert second["config"]["values"] == first["config"]["values"]
    assert second["settings"] == first["settings"] and second["threshold"] == first["threshold"]


def test_yaml_config(folders, tmp_path):
    pytest.importorskip("yaml")
    normal, images = folders
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"method: toy\nnormal: {normal}\nimages: {images}\nout: {out}\n"
        "threshold: 0.3\noption:\n  offset: 0.0\nquiet: true\n"
    )
    assert main(["predict", "--config", str(cfg)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["threshold"]["value"] == 0.3 and run["config"]["values"]["option"] == ["offset=0.0"]


@pytest.mark.parametrize(
    "data, words",
    [
        ({"out": "o", "metod": "toy", "thresold": 1}, ["unknown key(s) metod, thresold", "method"]),
        ({"out": "o", "batch_size": "eight"}, ["'batch_size'", "invalid int value 'eight'"]),
        ({"out": "o", "precision": "fp8"}, ["'precision'", "'fp8' is not one of fp32"]),
        ({"out": "o", "recursive": "yes"}, ["'recursive'", "expected true or false"]),
        ({"out": "o", "normal": ["a", "b"]}, ["'normal'", "expected one value, got a list"]),
        ({"out": "o", "config": "other.json"}, ["unknown key(s) config"]),
        (["not", "a", "mapping"], ["expected a mapping", "got list"]),
    ],
)
def test_bad_config_is_refused_naming_the_file_and_key(tmp_path, data, words):
    cfg = _write(tmp_path / "bad.json", data)
    with pytest.raises(SystemExit) as e:
        main(["predict", "--config", str(cfg)])
    msg = str(e.value)
    assert str(cfg) in msg, msg
    for w in words:
        assert w in msg, msg


def test_unreadable_config_files(tmp_path):
    with pytest.raises(SystemExit, match="cannot be read"):
        main(["fit", "--config", str(tmp_path / "missing.json")])
    (tmp_path / "broken.json").write_text("{method: toy")
    with pytest.raises(SystemExit, match=r"broken\.json: not valid JSON"):
        main(["fit", "--config", str(tmp_path / "broken.json")])


def test_fit_config_fills_required_options(folders, tmp_path, capsys):
    normal, _ = folders
    model = tmp_path / "model"
    cfg = _write(
        tmp_path / "fit.json",
        {"method": "patchcore", "backbone": "resnet18", "weights": "random", "image_size": 64,
         "normal": str(normal), "out": str(model)},
    )  # fmt: skip
    assert main(["fit", "--config", str(cfg), "-q"]) == 0
    assert (model / "model.json").is_file()
    assert "patchcore fitted on" in capsys.readouterr().out


def test_benchmark_config_writes_run_json(synthetic_root, tmp_path):
    out = tmp_path / "bench"
    cat = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())[0]
    cfg = _write(
        tmp_path / "bench.json",
        {"method": "toy", "dataset": "mvtec", "root": str(synthetic_root), "out": str(out),
         "categories": [cat], "shots": [1], "seeds": 10, "quiet": True},
    )  # fmt: skip
    assert main(["benchmark", "--config", str(cfg)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["values"]["shots"] == [1] and run["config"]["values"]["seeds"] == [10]
    assert run["config"]["file"] == str(cfg) and run["finished"] >= run["started"]
    assert (out / "results.csv").is_file()


def test_pairs_run_records_the_config(synthetic_root, tmp_path):
    cat = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    ref = sorted((cat / "train" / "good").glob("*.png"))[0]
    img = sorted(p for p in (cat / "test").rglob("*.png") if p.parent.name != "good")[0]
    (tmp_path / "pairs.csv").write_text(f"image,reference\n{img},{ref}\n")
    out = tmp_path / "o"
    cfg = _write(
        tmp_path / "pairs.json",
        {"method": "refdiff", "pairs": str(tmp_path / "pairs.csv"), "out": str(out),
         "threshold": 0.3, "option": {"image_size": 96}, "quiet": True},
    )  # fmt: skip
    assert main(["predict", "--config", str(cfg)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["values"]["pairs"] == str(tmp_path / "pairs.csv")
    assert run["config"]["values"]["option"] == ["image_size=96"]
