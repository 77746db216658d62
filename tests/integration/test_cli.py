"""The command line as a user meets it: help, list, synth, predict, benchmark, weights, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from anomalens.cli.main import build_parser, main

SUBCOMMANDS = ["list", "predict", "benchmark", "synth", "demo", "weights", "train", "serve"]


@pytest.mark.parametrize("cmd", [[], *([c] for c in SUBCOMMANDS)])
def test_help_explains_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: anomalens" in out
    if cmd == ["predict"]:
        for flag in ("--normal", "--images", "--threshold", "--calibration", "--weights"):
            assert flag in out


def test_list_shows_methods_and_datasets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "patchcore" in out and "few_shot" in out
    assert "mvtec" in out and "visa" in out


def test_synth_writes_mvtec_layout(tmp_path, capsys):
    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path),
                "--n-train",
                "2",
                "--n-test-good",
                "1",
                "--n-test-defect",
                "2",
                "--image-size",
                "64",
            ]
        )
        == 0
    )
    cats = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert cats
    for c in cats:
        assert len(list((c / "train" / "good").iterdir())) == 2
        assert (c / "ground_truth").is_dir()


def test_predict_patchcore_end_to_end(synthetic_root, tmp_path, capsys):
    cat = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    images = tmp_path / "incoming"
    images.mkdir()
    for p in sorted((cat / "test").rglob("*.png"))[:6]:
        (images / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            "--method",
            "patchcore",
            "--backbone",
            "resnet18",
            "--weights",
            "random",
            "--image-size",
            "64",
            "--normal",
            str(cat / "train" / "good"),
            "--images",
            str(images),
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 6 and all((out / r["overlay"]).is_file() for r in rows)
    assert "6 images scored" in capsys.readouterr().out


def test_predict_rejects_unknown_option_and_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit, match="no image file"):
        main(
            [
                "predict",
                "--method",
                "toy",
                "--normal",
                str(tmp_path / "empty"),
                "--images",
                str(tmp_path / "empty"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(SystemExit, match="does not accept option"):
        main(
            [
                "predict",
                "--method",
                "toy",
                "--option",
                "bogus=1",
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert (
        main(
            ["predict", "--method", "nope", "--images", str(tmp_path), "--out", str(tmp_path / "o")]
        )
        == 1
    )
    assert "Available:" in capsys.readouterr().err


def _bench(root: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "benchmark",
            "--method",
            "toy",
            "--dataset",
            "mvtec",
            "--root",
            str(root),
            "--shots",
            "1",
            "2",
            "--seeds",
            "10",
            "20",
            "--out",
            str(out),
            "-q",
            *extra,
        ]
    )


def test_benchmark_tables_and_resume(synthetic_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    assert _bench(synthetic_root, out) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    cats = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())
    assert len(rows) == len(cats) * 2 * 2
    for r in rows:
        for m in ("image_auroc", "pixel_auroc", "pixel_aupro", "seconds_per_image"):
            assert 0.0 <= float(r[m]) <= 1.0 or m == "seconds_per_image"
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert {s["category"] for s in summary} == {*cats, "mean"}
    md = (out / "results.md").read_text()
    assert "I-AUROC" in md and "±" in md
    # kill simulation: one job lost -> only that one is recomputed
    job = sorted((out / "jobs").rglob("*.json"))[0]
    job.unlink()
    from anomalens.benchmark import runner

    calls = []
    orig = runner.evaluate_category
    monkeypatch.setattr(
        runner, "evaluate_category", lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    )
    assert _bench(synthetic_root, out) == 0
    assert len(calls) == 1 and job.exists()


def test_benchmark_refuses_to_mix_jobs_of_other_settings(synthetic_root, tmp_path, capsys):
    out = tmp_path / "bench"
    cat = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())[0]
    assert _bench(synthetic_root, out, "--categories", cat) == 0
    n_jobs = len(list((out / "jobs").rglob("*.json")))
    capsys.readouterr()
    assert _bench(synthetic_root, out, "--categories", cat, "--pixel-mode", "binned") == 1
    err = capsys.readouterr().err
    assert "pixel_mode" in err and "binned" in err and str(out) in err
    assert json.loads((out / "config.json").read_text())["pixel_mode"] == "exact"
    # more seeds with the same settings extend the run
    assert _bench(synthetic_root, out, "--categories", cat, "--seeds", "10", "20", "30") == 0
    assert len(list((out / "jobs").rglob("*.json"))) == n_jobs + 2


def test_benchmark_unknown_category_lists_the_existing_ones(synthetic_root, tmp_path, capsys):
    assert _bench(synthetic_root, tmp_path / "b", "--categories", "no_such_thing") == 1
    err = capsys.readouterr().err
    assert "no_such_thing" in err and "Available:" in err
    for c in (p.name for p in synthetic_root.iterdir() if p.is_dir()):
        assert c in err


def test_weights_commands_cycle(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "m.safetensors").write_bytes(b"0123")
    assert main(["weights", "pack", str(tmp_path / "w"), "--out", str(tmp_path / "b.tar")]) == 0
    assert main(["weights", "unpack", str(tmp_path / "b.tar")]) == 0
    assert (tmp_path / "cache" / "m.safetensors").read_bytes() == b"0123"
    assert main(["weights", "list"]) == 0
    assert "wide_resnet50_2" in capsys.readouterr().out


def test_parser_builds():
    assert build_parser().prog == "anomalens"


def test_train_then_predict_with_the_checkpoint(synthetic_root, tmp_path, capsys):
    """`anomalens train` writes a checkpoint that `predict --checkpoint` loads (tiny CLIP)."""
    for method in ("adaptclip", "anomalyclip"):
        ckpt = tmp_path / f"{method}.safetensors"
        rc = main(
            [
                "train",
                method,
                "--dataset",
                "mvtec",
                "--root",
                str(synthetic_root),
                "--backbone",
                "anomalens-tiny-clip@64",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--out",
                str(ckpt),
                "-q",
            ]
        )
        assert rc == 0 and ckpt.is_file()
        cat = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
        args = [
            "predict",
            "--method",
            method,
            "--backbone",
            "anomalens-tiny-clip@64",
            "--checkpoint",
            str(ckpt),
            "--images",
            str(cat / "test"),
            "--recursive",
            "--out",
            str(tmp_path / f"pred_{method}"),
            "-q",
        ]
        if method == "adaptclip":
            args += ["--normal", str(cat / "train" / "good")]
        assert main(args) == 0
        run = json.loads((tmp_path / f"pred_{method}" / "run.json").read_text())
        assert run["settings"]["detector"]["method"] == method
    out = capsys.readouterr().out
    assert "checkpoint:" in out


def test_predict_groups_one_memory_per_sub_folder(synthetic_root, tmp_path, capsys):
    """Two synthetic categories in one command, no class names: --groups."""
    cats = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[:2]
    normal, images = tmp_path / "normal", tmp_path / "incoming"
    for cat in cats:
        (normal / cat.name).mkdir(parents=True)
        for p in sorted((cat / "train" / "good").glob("*.png"))[:3]:
            (normal / cat.name / p.name).write_bytes(p.read_bytes())
        (images / cat.name).mkdir(parents=True)
        for p in sorted((cat / "test").rglob("*.png"))[:4]:
            (images / cat.name / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    out = tmp_path / "out"
    argv = ["predict", "--method", "patchcore", "--backbone", "resnet18", "--weights", "random",
            "--image-size", "64", "--normal", str(normal), "--images", str(images),
            "--out", str(out), "--groups", "-q"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert all(f"{c.name}: 4 images scored" in printed for c in cats)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted({r["group"] for r in rows}) == [c.name for c in cats] and len(rows) == 8
    assert (out / "index.html").is_file() and all(
        (out / c.name / "report.html").is_file() for c in cats
    )
    (normal / cats[1].name / "extra").mkdir()
    for p in (normal / cats[1].name).glob("*.png"):
        p.unlink()
    assert main(argv) == 1
    assert f"no normal images for group(s) {cats[1].name}" in capsys.readouterr().err
