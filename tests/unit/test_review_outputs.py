"""predict's review outputs: threshold-only reruns re-judge stored scores, run.json, file modes."""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.fileio import atomic_write_text
from anomalens.pipeline import ThresholdSpec, run_predict
from anomalens.registry import create_detector


def _write(folder: Path, name: str, arr: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / name)
    return folder / name


@pytest.fixture
def folders(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    base = np.full((48, 64, 3), 120, np.uint8)
    normal = [
        _write(tmp_path / "normal", f"n{i}.png", np.full_like(base, v))
        for i, v in enumerate((118, 120, 122))
    ]
    bad = base.copy()
    bad[10:20, 20:30] = 255
    mild = base.copy()
    mild[30:40, 40:50] = 160
    images = [
        _write(tmp_path / "images", "good.png", base.copy()),
        _write(tmp_path / "images", "defect.png", bad),
        _write(tmp_path / "images", "mild.png", mild),
    ]
    return normal, images


class _Counting:
    """Factory of toy detectors that counts the images each one scores."""

    def __init__(self) -> None:
        self.scored = 0

    def __call__(self):
        det = create_detector("toy")
        orig = det._predict

        def counted(ims):
            self.scored += len(ims)
            return orig(ims)

        det._predict = counted
        return det


def _rows(out: Path) -> dict[str, dict[str, str]]:
    return {Path(r["path"]).name: r for r in csv.DictReader(open(out / "results.csv"))}


def _mask(out: Path, row: dict[str, str]) -> np.ndarray:
    return np.asarray(Image.open(out / row["mask"])) > 0


def test_changing_only_the_threshold_rejudges_without_scoring(folders, tmp_path):
    normal, images = folders
    out = tmp_path / "out"
    first = run_predict(
        lambda: create_detector("toy"),
        images,
        out,
        normal_paths=normal,
        threshold=ThresholdSpec(fixed=0.4, pixel_fixed=0.1),
        progress=False,
    )
    before = _rows(out)
    assert before["defect.png"]["decision"] == "anomalous"
    assert before["mild.png"]["decision"] == "normal"  # mild: score ~0.157, below 0.4
    assert not _mask(out, before["mild.png"]).any()  # no region on a normal image
    overlay_before = np.asarray(Image.open(out / before["mild.png"]["overlay"]))

    counting = _Counting()
    second = run_predict(
        counting,
        images,
        out,
        normal_paths=normal,
        threshold=ThresholdSpec(fixed=0.1, pixel_fixed=0.1),
        progress=False,
    )
    assert counting.scored == 0, "a threshold-only change must not score any image again"
    after = _rows(out)
    for name in before:
        assert float(after[name]["score"]) == float(before[name]["score"])
        assert float(after[name]["threshold"]) == 0.1
    assert after["mild.png"]["decision"] == "anomalous" and second.num_anomalous == 2
    assert _mask(out, after["mild.png"])[32:38, 42:48].all()  # its region is drawn now
    assert not (np.asarray(Image.open(out / after["mild.png"]["overlay"])) == overlay_before).all()
    assert first.rows[0]["seconds"] == second.rows[0]["seconds"]  # the stored rows, re-judged
    run = json.loads((out / "run.json").read_text())
    assert run["threshold"]["value"] == 0.1 and run["status"] == "complete"
    jsonl = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["decision"] for r in jsonl if r["path"].endswith("mild.png")} == {"anomalous"}

    # the same command again: nothing scored, nothing changed
    third = run_predict(
        counting,
        images,
        out,
        normal_paths=normal,
        threshold=ThresholdSpec(fixed=0.1, pixel_fixed=0.1),
        progress=False,
    )
    assert counting.scored == 0 and third.rows == second.rows


def test_a_missing_map_is_scored_again_on_a_threshold_change(folders, tmp_path):
    normal, images = folders
    out = tmp_path / "out"
    run_predict(
        lambda: create_detector("toy"),
        images,
        out,
        normal_paths=normal,
        threshold=ThresholdSpec(fixed=0.4),
        progress=False,
    )
    (out / "maps" / "defect.npy").unlink()
    counting = _Counting()
    run_predict(
        counting,
        images,
        out,
        normal_paths=normal,
        threshold=ThresholdSpec(fixed=0.1),
        progress=False,
    )
    assert counting.scored == 1
    assert (out / "maps" / "defect.npy").is_file()


def test_normalized_score_is_in_every_row_and_matches_the_decision(folders, tmp_path):
    normal, images = folders
    out = tmp_path / "out"
    s = run_predict(
        lambda: create_detector("toy"), images, out, normal_paths=normal, progress=False
    )  # leave-one-out: records the normal scores' range
    rows = _rows(out)
    assert list(next(csv.reader(open(out / "results.csv")))[:4]) == [
        "path",
        "score",
        "normalized_score",
        "decision",
    ]
    lo, hi = s.threshold.details["normal_score_min"], s.threshold.details["normal_score_max"]
    for r in rows.values():
        n = float(r["normalized_score"])
        assert 0.0 <= n <= 1.0 and (n > 0.5) == (r["decision"] == "anomalous")
        expect = min(1.0, max(0.0, (float(r["score"]) - s.threshold.value) / (hi - lo) + 0.5))
        assert n == pytest.approx(expect)
    fixed = run_predict(
        lambda: create_detector("toy"),
        images,
        tmp_path / "fixed",
        normal_paths=normal,
        threshold=ThresholdSpec(fixed=0.2),
        progress=False,
    )
    assert all(r["normalized_score"] is None for r in fixed.rows)  # no range recorded
    assert all(r["normalized_score"] == "" for r in _rows(tmp_path / "fixed").values())


def test_run_json_records_version_times_command_host_and_input_checksum(folders, tmp_path):
    from anomalens import __version__

    normal, images = folders
    out = tmp_path / "out"
    run_predict(
        lambda: create_detector("toy"),
        images,
        out,
        normal_paths=normal,
        progress=False,
        command=["anomalens", "predict", "--images", "my dir/"],
    )
    run = json.loads((out / "run.json").read_text())
    assert run["anomalens_version"] == __version__
    assert run["started"] <= run["finished"] and run["finished"].endswith("Z")
    assert run["command"] == "anomalens predict --images 'my dir/'"
    assert run["host"] and run["inputs"]["num_images"] == 3
    other = run_predict(
        lambda: create_detector("toy"),
        images[:2],
        tmp_path / "o2",
        normal_paths=normal,
        progress=False,
    )
    run2 = json.loads((other.out_dir / "run.json").read_text())
    assert run2["inputs"]["images_sha256"] != run["inputs"]["images_sha256"]
    assert len(run["inputs"]["images_sha256"]) == 64


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_follow_the_users_umask(folders, tmp_path, umask):
    normal, images = folders
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        out = tmp_path / "out"
        run_predict(
            lambda: create_detector("toy"), images, out, normal_paths=normal, progress=False
        )
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == want
    for f in (
        "results.csv",
        "run.json",
        "report.html",
        "overlays/defect_overlay.png",
        "masks/defect_mask.png",
        "maps/defect.npy",
    ):
        assert stat.S_IMODE((out / f).stat().st_mode) == want, f


def test_report_links_are_relative_and_percent_encoded(tmp_path):
    base = np.full((32, 32, 3), 120, np.uint8)
    normal = [_write(tmp_path / "n", f"{i}.png", base) for i in range(2)]
    img = _write(tmp_path / "in", "a #1 100%.png", base)
    out = tmp_path / "out"
    run_predict(lambda: create_detector("toy"), [img], out, normal_paths=normal, progress=False)
    page = (out / "report.html").read_text()
    assert "../in/a%20%231%20100%25.png" in page
    data = json.loads(page.split('id="data">')[1].split("</script>")[0])
    item = data["items"][0]
    assert item["image"] == "../in/a%20%231%20100%25.png"
    assert item["overlay"].startswith("overlays/") and item["heat"].startswith("review/")
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # nothing from outside
    assert (out / "review" / "colorbar.png").is_file()


def test_an_image_a_browser_cannot_show_gets_a_png_copy_for_the_page(tmp_path):
    base = np.full((32, 40, 3), 120, np.uint8)
    normal = [_write(tmp_path / "n", f"{i}.png", base) for i in range(2)]
    tif = tmp_path / "in" / "part.tif"
    tif.parent.mkdir()
    Image.fromarray(base).save(tif)
    out = tmp_path / "out"
    run_predict(lambda: create_detector("toy"), [tif], out, normal_paths=normal, progress=False)
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["view"] == "review/part_image.png"
    assert (np.asarray(Image.open(out / row["view"])) == base).all()
    page = (out / "report.html").read_text()
    data = json.loads(page.split('id="data">')[1].split("</script>")[0])
    assert data["items"][0]["image"] == "review/part_image.png"


def test_a_rejudged_run_without_result_images_drops_the_stale_links(folders, tmp_path):
    normal, images = folders
    out = tmp_path / "out"
    run_predict(
        lambda: create_detector("toy"),
        images,
        out,
        normal_paths=normal,
        threshold=ThresholdSpec(fixed=0.4),
        progress=False,
    )
    counting = _Counting()
    s = run_predict(
        counting,
        images,
        out,
        normal_paths=normal,
        threshold=ThresholdSpec(fixed=0.1),
        save_overlays=False,
        save_masks=False,
        progress=False,
    )
    assert counting.scored == 0 and s.num_anomalous == 2
    assert all(r["overlay"] == "" and r["mask"] == "" for r in s.rows)
