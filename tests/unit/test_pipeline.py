"""Folder inference: outputs, thresholds, bad files, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.pipeline import ThresholdSpec, run_predict
from anomalens.registry import create_detector
from anomalens.thresholds import calibrate_leave_one_out, fixed_threshold


def _write(folder: Path, name: str, arr: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    Image.fromarray(arr).save(p)
    return p


def test_rows_of_another_scored_batch_are_not_reused(tmp_path, caplog):
    """Same command and image list, but one image became unreadable: the batch scored
    together is another one, so no stored row (scored in the old batch) is kept."""
    images = tmp_path / "batch"
    for i in range(6):
        _write(images, f"g{i}.png", np.full((16, 16, 3), 60 + 30 * i, np.uint8))
    paths = sorted(images.iterdir())
    spec = ThresholdSpec(fixed=0.2)
    out = tmp_path / "o"
    run_predict(lambda: create_detector("toy-batch"), paths, out, threshold=spec, progress=False)
    paths[0].write_bytes(b"no longer an image")
    again = run_predict(
        lambda: create_detector("toy-batch"), paths, out, threshold=spec, progress=False
    )
    assert "another batch of images scored together" in caplog.text
    fresh = run_predict(
        lambda: create_detector("toy-batch"), paths, tmp_path / "f", threshold=spec, progress=False
    )
    assert [r["score"] for r in again.rows] == [r["score"] for r in fresh.rows]
    assert len(again.rows) == 5
    run = json.loads((out / "run.json").read_text())
    assert run["scored_batch"]["num_images"] == 5


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    normal, images = tmp_path / "normal", tmp_path / "images"
    base = np.full((48, 64, 3), 120, np.uint8)
    for i, v in enumerate((118, 120, 122)):  # normal variation: brightness +-2
        _write(normal, f"n{i}.png", np.full_like(base, v))
    _write(images, "good.png", base.copy())
    bad = base.copy()
    bad[10:20, 20:30] = 255
    _write(images, "defect.png", bad)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return normal, images


def test_predict_writes_everything_and_flags_the_defect(folders, tmp_path):
    normal, images = folders
    out = tmp_path / "out"
    paths = sorted(images.iterdir())
    s = run_predict(
        lambda: create_detector("toy"),
        paths,
        out,
        normal_paths=sorted(normal.iterdir()),
        progress=False,
    )
    assert s.num_scored == 2 and s.num_errors == 1
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["defect.png"]["decision"] == "anomalous"
    assert rows["good.png"]["decision"] == "normal"
    assert float(rows["defect.png"]["threshold"]) == pytest.approx(s.threshold.value)
    errors = list(csv.DictReader(open(out / "errors.csv")))
    assert errors[0]["path"].endswith("broken.jpg") and "corrupt" in errors[0]["error"]
    for r in rows.values():
        assert (out / r["overlay"]).is_file() and (out / r["mask"]).is_file()
    mask = np.asarray(Image.open(out / rows["defect.png"]["mask"]))
    assert mask.shape == (48, 64) and mask[12:18, 22:28].all() and not mask[40:, :10].any()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["threshold"]["method"] == "leave-one-out"
    html = (out / "report.html").read_text()
    assert html.index("defect.png") < html.index("good.png")  # worst first
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_resume_skips_scored_images_and_recovers_a_torn_line(folders, tmp_path):
    normal, images = folders
    out = tmp_path / "out"
    paths = sorted(images.iterdir())
    args = dict(normal_paths=sorted(normal.iterdir()), progress=False)
    run_predict(lambda: create_detector("toy"), paths, out, **args)
    lines = (out / "results.jsonl").read_text().splitlines()
    # simulate a run killed while writing its second line
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:10])
    calls = []

    def factory():
        det = create_detector("toy")
        orig = det._predict
        det._predict = lambda ims: (calls.append(len(ims)), orig(ims))[1]
        return det

    s = run_predict(factory, paths, out, **args)
    # threshold calibration scores 3 held-out shots one by one; then only ONE image is recomputed
    assert calls == [1, 1, 1, 1]
    assert s.num_scored == 2
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # the torn fragment is gone: every line is a whole row (a third run would reuse them all)
    assert sorted(Path(json.loads(line)["path"]).name for line in lines) == [
        "defect.png",
        "good.png",
    ]


def test_fixed_threshold_and_calibration_folder(folders, tmp_path):
    normal, images = folders
    paths = sorted(images.iterdir())
    s = run_predict(
        lambda: create_detector("toy"),
        paths,
        tmp_path / "a",
        normal_paths=sorted(normal.iterdir()),
        threshold=ThresholdSpec(fixed=1e9),
        progress=False,
    )
    assert s.num_anomalous == 0 and s.threshold.method == "fixed"
    s = run_predict(
        lambda: create_detector("toy"),
        paths,
        tmp_path / "b",
        normal_paths=sorted(normal.iterdir())[:1],
        threshold=ThresholdSpec(calibration=sorted(normal.iterdir())),
        progress=False,
    )
    assert s.threshold.method == "normal-folder" and s.threshold.details["num_images"] == 3


def test_leave_one_out_needs_two_shots_and_is_the_max():
    img = [np.full((8, 8, 3), v, np.uint8) for v in (100, 110, 130)]
    thr = calibrate_leave_one_out(lambda: create_detector("toy"), img)
    # held-out scores: |100-120|, |110-115|, |130-105| on the 0..1 scale -> max is 25/255
    assert thr.value == pytest.approx(25 / 255, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        calibrate_leave_one_out(lambda: create_detector("toy"), img[:1])
    assert fixed_threshold(0.3).decide(0.31) == "anomalous"
    assert fixed_threshold(0.3).decide(0.3) == "normal"


def test_few_shot_method_without_normals_is_a_clear_error(folders, tmp_path):
    _, images = folders
    with pytest.raises(ValueError, match="--normal"):
        run_predict(
            lambda: create_detector("toy"), sorted(images.iterdir()), tmp_path / "o", progress=False
        )


def test_zero_shot_without_normals_uses_the_method_default(folders, tmp_path):
    _, images = folders
    s = run_predict(
        lambda: create_detector("toy-zero"),
        sorted(images.iterdir()),
        tmp_path / "z",
        progress=False,
    )
    assert s.threshold.method == "default" and s.threshold.value == 0.5
    verdicts = {Path(r["path"]).name: r["decision"] for r in s.rows}
    assert verdicts == {"defect.png": "anomalous", "good.png": "normal"}  # max 255/255 vs 120/255


def test_batch_method_sets_a_robust_threshold_from_its_own_batch(tmp_path):
    images = tmp_path / "batch"
    for i in range(6):
        _write(images, f"g{i}.png", np.full((32, 32, 3), 100 + i, np.uint8))
    bad = np.full((32, 32, 3), 100, np.uint8)
    bad[5:15, 5:15] = 250
    _write(images, "bad.png", bad)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    calls = []

    def factory():
        det = create_detector("toy-batch")
        orig = det._predict
        det._predict = lambda ims: (calls.append(len(ims)), orig(ims))[1]
        return det

    s = run_predict(factory, sorted(images.iterdir()), tmp_path / "o", progress=False)
    assert calls == [7]  # one batch call: the threshold reuses the scores
    assert s.threshold.method == "batch-robust" and s.num_errors == 1
    flagged = [Path(r["path"]).name for r in s.rows if r["decision"] == "anomalous"]
    assert flagged == ["bad.png"]


def test_output_names_follow_the_folder_structure():
    from anomalens.pipeline import _unique_names

    root = Path("/data/line1")
    paths = [root / "good" / "000.png", root / "crack" / "000.png", root / "good" / "001.png"]
    assert _unique_names(paths) == ["good_000", "crack_000", "good_001"]
    assert _unique_names([root / "a.png", root / "b.jpg", root / "a.jpg"]) == ["a", "b", "a__1"]


def test_single_shot_of_a_zero_or_few_shot_method_is_scored_zero_shot():
    from anomalens.types import LearningType

    assert create_detector("toy-zero-or-few").learning_type is LearningType.ZERO_OR_FEW_SHOT
    img = [np.full((8, 8, 3), 200, np.uint8)]
    thr = calibrate_leave_one_out(lambda: create_detector("toy-zero-or-few"), img)
    assert thr.value == pytest.approx(200 / 255, abs=1e-5) and thr.details["num_shots"] == 1


def test_resume_does_not_reuse_rows_of_another_image_list(folders, tmp_path):
    normal, images = folders
    paths = sorted(images.iterdir())
    args = dict(normal_paths=sorted(normal.iterdir()), progress=False)
    run_predict(lambda: create_detector("toy"), paths[:2], tmp_path / "o", **args)
    other = tmp_path / "other"
    other.mkdir()
    for p in paths[:2]:
        (other / f"x_{p.name}").write_bytes(p.read_bytes())
    s = run_predict(lambda: create_detector("toy"), sorted(other.iterdir()), tmp_path / "o", **args)
    assert {Path(r["path"]).parent for r in s.rows} == {other}
    lines = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    assert all(str(other) in line for line in lines)


def test_resumed_batch_method_rescores_the_whole_batch(tmp_path):
    """A batch method's result depends on the whole batch: a resumed run with a fixed
    threshold must give the rows of an uninterrupted run, not score the rest alone."""
    images = tmp_path / "batch"
    for i in range(6):
        _write(images, f"g{i}.png", np.full((16, 16, 3), 60 + 30 * i, np.uint8))
    paths = sorted(images.iterdir())
    spec = ThresholdSpec(fixed=0.2)
    full = run_predict(
        lambda: create_detector("toy-batch"), paths, tmp_path / "a", threshold=spec, progress=False
    )
    out = tmp_path / "b"
    run_predict(lambda: create_detector("toy-batch"), paths, out, threshold=spec, progress=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")  # killed after 2 rows
    groups_seen = []

    def factory():
        det = create_detector("toy-batch")
        orig = det._predict_grouped
        det._predict_grouped = lambda ims, g: (groups_seen.append(g), orig(ims, g))[1]
        return det

    resumed = run_predict(factory, paths, out, threshold=spec, progress=False)
    assert groups_seen == [["batch"] * 6]  # one call over all images, parent folder as group
    by_path = {r["path"]: r["score"] for r in full.rows}
    assert len(resumed.rows) == 6
    for r in resumed.rows:
        assert r["score"] == pytest.approx(by_path[r["path"]], abs=1e-6)


@pytest.fixture
def grouped(tmp_path: Path) -> tuple[Path, Path]:
    """Two products: 'dark' (grey ~60) and 'light' (grey ~200); each has a normal and a
    defective image to inspect. A single memory of both would flag every normal image."""
    normal, images = tmp_path / "normal", tmp_path / "images"
    for group, level in (("dark", 60), ("light", 200)):
        for i, d in enumerate((-2, 0, 2)):
            _write(normal / group, f"n{i}.png", np.full((32, 32, 3), level + d, np.uint8))
        _write(images / group, "good.png", np.full((32, 32, 3), level + 1, np.uint8))
        bad = np.full((32, 32, 3), level, np.uint8)
        bad[8:16, 8:16] = 255 - level
        _write(images / group / "line2", "defect.png", bad)
    return normal, images


def test_grouped_run_fits_one_memory_and_threshold_per_group(grouped, tmp_path):
    from anomalens.pipeline import run_predict_groups, split_by_group

    normal, images = grouped
    normals = sorted(normal.rglob("*.png"))
    paths = sorted(images.rglob("*.png"))
    out = tmp_path / "out"
    summaries = run_predict_groups(
        lambda: create_detector("toy"),
        split_by_group(images, paths),
        out,
        normal_groups=split_by_group(normal, normals),
        progress=False,
    )
    assert list(summaries) == ["dark", "light"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    decisions = {(r["group"], Path(r["path"]).name): r["decision"] for r in rows}
    assert decisions == {
        ("dark", "good.png"): "normal",
        ("dark", "defect.png"): "anomalous",
        ("light", "good.png"): "normal",
        ("light", "defect.png"): "anomalous",
    }
    assert all((out / r["overlay"]).is_file() for r in rows)
    assert (out / "dark" / "report.html").is_file() and (out / "light" / "run.json").is_file()
    index = (out / "index.html").read_text()
    assert "dark/report.html" in index and "light/report.html" in index
    # one memory of both products: the normal images of each are far from the mean
    single = run_predict(
        lambda: create_detector("toy"), paths, tmp_path / "single", normal_paths=normals,
        threshold=ThresholdSpec(fixed=0.2), progress=False,
    )  # fmt: skip
    assert all(r["decision"] == "anomalous" for r in single.rows)


def test_grouped_run_refuses_a_group_without_normal_images(grouped, tmp_path):
    from anomalens.pipeline import run_predict_groups, split_by_group

    normal, images = grouped
    normals = sorted((normal / "dark").glob("*.png"))
    with pytest.raises(ValueError, match=r"no normal images for group.*light"):
        run_predict_groups(
            lambda: create_detector("toy"),
            split_by_group(images, sorted(images.rglob("*.png"))),
            tmp_path / "out",
            normal_groups=split_by_group(normal, normals),
            progress=False,
        )
    assert not (tmp_path / "out" / "dark").exists()  # refused before computing anything
    _write(images, "loose.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="not in a group sub-folder"):
        split_by_group(images, sorted(images.rglob("*.png")))


def test_csv_outputs_escape_spreadsheet_formulas(folders, tmp_path, monkeypatch):
    import csv as _csv

    from anomalens.fileio import spreadsheet_safe

    normal, images = folders
    (images / "=HYPERLINK(1).png").write_bytes((images / "good.png").read_bytes())
    (images / "@SUM(1).png").write_bytes(b"not an image")
    monkeypatch.chdir(images)  # relative paths, as `--images .` gives them
    run_predict(
        lambda: create_detector("toy"),
        [Path("=HYPERLINK(1).png"), Path("@SUM(1).png")],
        tmp_path / "o",
        normal_paths=sorted(normal.iterdir()),
        threshold=ThresholdSpec(fixed=0.5),
        progress=False,
    )
    (row,) = _csv.DictReader((tmp_path / "o" / "results.csv").open())
    (err,) = _csv.DictReader((tmp_path / "o" / "errors.csv").open())
    assert row["path"] == "'=HYPERLINK(1).png" and err["path"] == "'@SUM(1).png"
    assert float(row["score"]) >= 0  # numbers stay numbers
    assert spreadsheet_safe("=cmd") == "'=cmd" and spreadsheet_safe(-1.5) == -1.5


def test_a_rerun_with_other_settings_says_what_changed(folders, tmp_path, caplog):
    normal, images = folders
    paths = sorted(images.iterdir())
    args = dict(normal_paths=sorted(normal.iterdir()), progress=False)
    run_predict(lambda: create_detector("toy"), paths, tmp_path / "o", **args)
    with caplog.at_level("WARNING", logger="anomalens.pipeline"):
        run_predict(lambda: create_detector("toy", offset=0.5), paths, tmp_path / "o", **args)
    assert "they are recomputed" in caplog.text and "offset" in caplog.text


def test_huge_images_are_reduced_while_decoding(folders, tmp_path):
    from anomalens.pipeline import DECODE_SIDE

    normal, _ = folders
    big = tmp_path / "big"
    big.mkdir()
    side = 2 * DECODE_SIDE + 100  # both sides over twice the decode side: halved on decode
    Image.fromarray(np.full((side, side, 3), 120, np.uint8)).save(big / "huge.png")
    s = run_predict(
        lambda: create_detector("toy"),
        [big / "huge.png"],
        tmp_path / "o",
        normal_paths=sorted(normal.iterdir()),
        threshold=ThresholdSpec(fixed=0.5),
        progress=False,
    )
    mask = np.asarray(Image.open(tmp_path / "o" / s.rows[0]["mask"]))
    assert mask.shape == (side // 2, side // 2)
