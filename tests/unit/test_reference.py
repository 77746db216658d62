"""Reference-based inspection: pairs input, the refdiff method, alignment, DeepPCB reader."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.data.align import align_to_reference, map_to_image
from anomalens.data.pairs import (
    load_pair_mask,
    make_pairs_index,
    pairs_from_reference_dir,
    read_pairs_csv,
)
from anomalens.detectors.refdiff import local_range, tolerant_difference
from anomalens.reference import PairsThreshold, run_predict_pairs
from anomalens.registry import create_detector

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (the team's shared/ folder beside the checkout)")
    return p


def _board(seed: int = 0, size: int = 96) -> np.ndarray:
    """A synthetic binary 'circuit': random horizontal and vertical traces."""
    rng = np.random.default_rng(seed)
    im = np.full((size, size), 20, np.uint8)
    for _ in range(8):
        y, x = rng.integers(4, size - 4, 2)
        if rng.random() < 0.5:
            im[y : y + 3, 4 : size - 4] = 230
        else:
            im[4 : size - 4, x : x + 3] = 230
    return np.repeat(im[..., None], 3, axis=2)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _defect(board: np.ndarray) -> np.ndarray:
    out = board.copy()
    out[40:48, 40:48] = 255 - out[40:48, 40:48]
    return out


def test_tolerant_difference_ignores_small_shifts_and_sees_defects() -> None:
    ref = torch.from_numpy(_board()[..., 0].astype(np.float32) / 255)[None, None]
    shifted = torch.roll(ref, shifts=(2, -1), dims=(2, 3))
    low, high = local_range(ref, 2)
    assert tolerant_difference(shifted, low, high)[0, 8:-8, 8:-8].max() == 0
    plain = (shifted - ref).abs().amax()
    assert plain > 0.5  # a plain difference lights up every moved edge
    bad = torch.from_numpy(_defect(_board())[..., 0].astype(np.float32) / 255)[None, None]
    d = tolerant_difference(bad, low, high)[0]
    assert d[40:48, 40:48].max() > 0.5 and d[:30, :30].max() == 0


def test_refdiff_scores_the_defective_copy_higher() -> None:
    det = create_detector("refdiff", image_size=96, tolerance=2, sigma=2.0)
    board = _board()
    det.fit([board])
    shifted = np.roll(board, 1, axis=1)
    pred = det.predict([shifted, _defect(board)])
    assert pred.image_score[1] > 5 * pred.image_score[0]
    amap = pred.anomaly_map[1]
    assert amap[40:48, 40:48].mean() > amap[:30, :30].mean() + 0.1
    # several references: the best-matching one counts
    det.fit([_board(seed=5), board])
    assert det.predict([shifted]).image_score[0] == pytest.approx(float(pred.image_score[0]))


def test_pairs_csv_columns_and_missing_files_are_refused_before_work(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.png", _board())
    r = _save(tmp_path / "refs" / "a.png", _board())
    good = tmp_path / "pairs.csv"
    good.write_text("image,reference\na.png,refs/a.png\n")
    (s,) = read_pairs_csv(good)
    assert s.image_path == a and s.reference_path == r and s.label == -1
    bad = tmp_path / "bad.csv"
    bad.write_text("image,reference,colour\na.png,refs/a.png,red\n")
    with pytest.raises(ValueError, match="unknown: colour"):
        read_pairs_csv(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("image,reference\na.png,refs/nope.png\nb.png,refs/a.png\n")
    with pytest.raises(ValueError, match=r"2 file\(s\) not found: line 2: .*nope\.png"):
        read_pairs_csv(missing)


def test_reference_dir_rule(tmp_path: Path) -> None:
    imgs = tmp_path / "in"
    refs = tmp_path / "ref"
    a = _save(imgs / "line" / "a.png", _board())
    b = _save(imgs / "b.jpg", _board())
    c = _save(imgs / "c.png", _board())
    ra = _save(refs / "line" / "a.png", _board())  # same relative path
    rb = _save(refs / "b.png", _board())  # same stem, other extension
    samples = pairs_from_reference_dir([a, b, c], imgs, refs)
    assert [s.reference_path for s in samples] == [ra, rb, None]


def test_box_masks_have_inclusive_corners(tmp_path: Path) -> None:
    f = tmp_path / "1.txt"
    f.write_text("2 3 4 5 1\n\n")
    m = load_pair_mask(f, (8, 8))
    assert m.sum() == 3 * 3 and m[3:6, 2:5].all()
    f.write_text("2 x 4 5 1\n")
    with pytest.raises(ValueError, match="line 1"):
        load_pair_mask(f, (8, 8))


def _deeppcb(tmp: Path, n: int = 3) -> Path:
    root = tmp / "pcb"
    for i in range(n):
        board = _board(seed=i)
        _save(root / "group7" / "7" / f"7000{i}_temp.jpg", board)
        _save(root / "group7" / "7" / f"7000{i}_test.jpg", _defect(board))
        (root / "group7" / "7_not").mkdir(parents=True, exist_ok=True)
        (root / "group7" / "7_not" / f"7000{i}.txt").write_text("40 40 47 47 1\n")
    return root


def test_deeppcb_layout_index_and_benchmark(tmp_path: Path) -> None:
    from anomalens.benchmark.runner import BenchmarkConfig, run_benchmark

    root = _deeppcb(tmp_path)
    test = make_pairs_index(root, "group7", "test")
    assert len(test) == 3 and all(s.reference_path.name.endswith("_temp.jpg") for s in test)
    assert make_pairs_index(root, "group7", "train") == []
    with pytest.raises(ValueError, match="Groups there: group7"):
        make_pairs_index(root, "group9", "test")
    cfg = BenchmarkConfig(
        method="refdiff",
        dataset="pairs",
        root=str(root),
        out=str(tmp_path / "bench"),
        method_kwargs={"image_size": 96, "tolerance": 2, "sigma": 2.0},
    )
    with pytest.warns(UserWarning):  # no normal test image: image metrics undefined
        (row,) = run_benchmark(cfg, progress=False)
    assert row["k"] == 1 and row["num_test_images"] == 3
    assert row["pixel_auroc"] > 0.95


def test_predict_pairs_goes_on_past_a_missing_reference(tmp_path: Path) -> None:
    board = _board()
    imgs = [_save(tmp_path / "in" / f"{i}.png", b) for i, b in enumerate([board, _defect(board)])]
    lonely = _save(tmp_path / "in" / "lonely.png", board)
    ref = _save(tmp_path / "ref" / "0.png", board)
    big_ref = np.asarray(Image.fromarray(board).resize((192, 192), Image.Resampling.NEAREST))
    _save(tmp_path / "ref" / "1.png", big_ref)  # another size: resized to the image
    pairs = pairs_from_reference_dir([*imgs, lonely], tmp_path / "in", tmp_path / "ref")
    assert pairs[0].reference_path == ref
    s = run_predict_pairs(
        lambda: create_detector("refdiff", image_size=96, tolerance=2, sigma=2.0),
        pairs,
        tmp_path / "out",
        threshold=PairsThreshold(fixed=0.3),
        progress=False,
    )
    assert s.num_scored == 2 and s.num_errors == 1 and s.num_anomalous == 1
    errors = list(csv.DictReader((tmp_path / "out" / "errors.csv").open()))
    assert errors[0]["path"].endswith("lonely.png") and "no reference" in errors[0]["error"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["decision"] for r in rows] == ["normal", "anomalous"]
    mask = np.asarray(Image.open(tmp_path / "out" / rows[1]["mask"]))
    assert mask.shape == (96, 96) and mask[40:48, 40:48].any() and not mask[:20, :20].any()
    # a rerun resumes: nothing is scored again
    calls = []

    def counting():
        det = create_detector("refdiff", image_size=96, tolerance=2, sigma=2.0)
        orig = det._predict
        det._predict = lambda ims: (calls.append(1), orig(ims))[1]
        return det

    run_predict_pairs(
        counting, pairs, tmp_path / "out", threshold=PairsThreshold(fixed=0.3), progress=False
    )
    assert calls == []


def test_ecc_alignment_undoes_a_shift_and_maps_back() -> None:
    pytest.importorskip("cv2")
    board = _board(size=128)
    moved = np.roll(board, (3, -4), axis=(0, 1))
    al = align_to_reference(moved, board, "ecc")
    assert al.ok
    inner = (slice(16, -16), slice(16, -16))
    assert np.abs(al.aligned[inner].astype(int) - board[inner]).mean() < 3
    amap = np.zeros((128, 128), np.float32)
    amap[60:70, 60:70] = 1.0
    back = map_to_image(amap, al, moved.shape[:2])
    ys, xs = np.nonzero(back > 0.5)
    assert abs(ys.mean() - 64.5 - 3) < 1 and abs(xs.mean() - 64.5 + 4) < 1
    with pytest.raises(ValueError, match="unknown alignment"):
        align_to_reference(moved, board, "sift")


def test_cli_pairs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalens.cli.main import main

    board = _board()
    _save(tmp_path / "a.png", _defect(board))
    _save(tmp_path / "a_ref.png", board)
    (tmp_path / "pairs.csv").write_text("image,reference\na.png,a_ref.png\n")
    rc = main(
        [
            "predict", "--method", "refdiff", "--option", "image_size=96", "--option", "sigma=2", "--pairs",
            str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "o"), "--threshold", "0.3", "-q",
        ]
    )  # fmt: skip
    assert rc == 0 and "1 pairs scored, 1 anomalous" in capsys.readouterr().out
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["settings"]["align"] == "none"


@pytest.mark.shared
def test_refdiff_beats_plain_difference_on_real_pcb_pairs() -> None:
    from anomalens.benchmark.pairs import evaluate_pairs

    root = shared_path("data", "deeppcb")
    pairs = make_pairs_index(root, "group12100", "test")[:12]
    plain = evaluate_pairs(create_detector("refdiff", tolerance=0, sigma=0.0), pairs)
    ours = evaluate_pairs(create_detector("refdiff"), pairs)
    # measured on these 12 pairs (AUROC / AP / AUPRO): plain 0.569 / 0.028 / 0.247,
    # refdiff 0.921 / 0.395 / 0.784; asserted: about half of each gain
    assert ours["pixel_auroc"] > plain["pixel_auroc"] + 0.15
    assert ours["pixel_ap"] > plain["pixel_ap"] + 0.18
    assert ours["pixel_aupro"] > plain["pixel_aupro"] + 0.25
