"""File names and folder entries that used to stop ``predict`` (issue 14, item 2).

Every entry named like an image gets a result or an ``errors.csv`` row naming it, and the run
goes on: non-UTF-8 names, links to images outside ``--images``, very long stems, link loops,
dangling links, FIFOs and folders named like images.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.cli.main import main

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names and FIFOs")


def _png(path: Path, value: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture
def messy(tmp_path: Path) -> tuple[Path, Path]:
    good = tmp_path / "good"
    for i in range(3):
        _png(good / f"g{i}.png", 120 + i)
    images = tmp_path / "images"
    _png(images / "plain.png")
    outside = _png(tmp_path / "elsewhere" / "outside.png", 200)
    os.symlink(outside, images / "link_outside.png")
    os.symlink(images / "nowhere.png", images / "dangling.png")
    os.symlink(images / "loop_b.png", images / "loop_a.png")
    os.symlink(images / "loop_a.png", images / "loop_b.png")
    os.mkfifo(images / "fifo.png")
    (images / "folder.png").mkdir()
    _png(images / ("x" * 240 + ".png"))  # a 244-byte name: derived names would be too long
    raw = os.fsencode(images) + b"/caf\xe9_latin1.png"  # not UTF-8
    with open(raw, "wb") as fh:
        buf = _png(tmp_path / "tmp.png").read_bytes()
        fh.write(buf)
    return good, images


def test_every_entry_gets_a_result_or_an_error_row(messy, tmp_path: Path, capsys) -> None:
    good, images = messy
    out = tmp_path / "out"
    argv = [
        "predict", "--method", "patchcore", "--backbone", "resnet18", "--weights", "random",
        "--option", "image_size=32", "--normal", str(good), "--images", str(images),
        "--out", str(out), "-q",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    errors = list(csv.DictReader((out / "errors.csv").open(encoding="utf-8")))
    scored = sorted(Path(r["path"]).name for r in rows)
    failed = {Path(e["path"]).name: e["error"] for e in errors}
    assert "plain.png" in scored and "link_outside.png" in scored
    assert "x" * 240 + ".png" in scored
    assert any(n.startswith("caf\\xe9") for n in scored)  # shown with its byte escaped
    assert failed["dangling.png"].startswith("dangling symbolic link")
    assert failed["loop_a.png"] == failed["loop_b.png"] == "symbolic link loop"
    assert failed["fifo.png"].startswith("not a regular file")
    assert failed["folder.png"] == "a folder, not an image file"
    assert len(rows) + len(errors) == 9  # every entry exactly once
    # derived output names are bounded and unique
    names = [Path(r["overlay"]).name for r in rows]
    assert len(set(names)) == len(names) and max(len(n.encode()) for n in names) < 200
    assert all((out / r["overlay"]).is_file() and (out / r["mask"]).is_file() for r in rows)
    # a rerun resumes instead of aborting, with the same accounting
    assert main(argv) == 0
    again = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert sorted(r["path"] for r in again) == sorted(r["path"] for r in rows)
    assert "4 images scored" in capsys.readouterr().out.splitlines()[-3]
