"""Sharded Parquet results (``predict --parquet``): schema, atomic shards, resume, no Ray."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.cli.main import main
from anomalens.pipeline import RESULT_FIELDS, ThresholdSpec, run_predict
from anomalens.registry import create_detector
from anomalens.results_parquet import COLUMNS, PARQUET_DIR, ParquetShards, require_pyarrow

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _row(i: int, **kw) -> dict:
    row = {
        "path": f"/in/im{i:02d}.png",
        "score": 0.1 * i,
        "normalized_score": None if i == 0 else 0.5,
        "decision": "anomalous" if i % 3 == 0 else "normal",
        "threshold": 0.25,
        "overlay": f"overlays/im{i:02d}_overlay.png",
        "mask": "",
        "seconds": 0.01,
        "map": f"maps/im{i:02d}.npy",  # not a column: left out
    }
    return {**row, **kw}


def _read(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def _stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}


def test_columns_are_those_of_results_csv_with_types() -> None:
    assert tuple(n for n, _, _ in COLUMNS) == RESULT_FIELDS
    from anomalens.results_parquet import parquet_schema

    schema = parquet_schema()
    assert schema.field("score").type == pa.float64() and schema.field("path").type == pa.string()
    assert schema.field("normalized_score").nullable and not schema.field("path").nullable


def test_shards_of_n_rows_read_back_exactly(tmp_path: Path) -> None:
    folder = tmp_path / PARQUET_DIR
    w = ParquetShards(folder, rows_per_shard=4)
    rows = [_row(i) for i in range(10)]
    w.add(rows[:3])
    assert not list(folder.glob("part-*"))  # nothing until a shard is full
    w.add(rows[3:])
    w.add([rows[2]])  # a path already taken is not written twice
    w.close()
    assert sorted(p.name for p in folder.iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet",
    ]  # fmt: skip
    assert [len(pq.read_table(p)) for p in sorted(folder.iterdir())] == [4, 4, 2]
    back = _read(folder)
    assert back == [{k: r[k] for k in RESULT_FIELDS} for r in rows]
    assert back[0]["normalized_score"] is None
    assert w.summary() == {"folder": PARQUET_DIR, "rows_per_shard": 4, "shards": 3, "rows": 10}
    assert pq.read_table(folder / "part-00000.parquet").schema.equals(w.schema)


def test_resume_keeps_matching_shards_and_writes_each_other_row_once(tmp_path: Path) -> None:
    folder = tmp_path / PARQUET_DIR
    rows = {
        r["path"]: r for r in (_row(i, score=math.nan if i == 5 else 0.1 * i) for i in range(9))
    }
    w = ParquetShards(folder, rows_per_shard=3)
    w.add(list(rows.values())[:6])  # a killed run: two shards written, nothing pending
    (folder / ".part-00002.parquet.abc.tmp").write_bytes(b"half a shard")
    stamps = _stamps(folder)

    again = ParquetShards(folder, rows, rows_per_shard=3)  # the run resumed with all 9 rows
    assert not list(folder.glob("*.tmp"))
    assert stamps.items() <= _stamps(folder).items()  # kept as they are (NaN equal to NaN)
    again.close()
    back = _read(folder)
    assert [r["path"] for r in back] == list(rows)  # each row once, in order

    # another threshold: the rows re-judged; shards with changed rows go, rows written once
    changed = {k: {**r, "threshold": 0.5} if i >= 3 else r for i, (k, r) in enumerate(rows.items())}
    third = ParquetShards(folder, changed, rows_per_shard=3)
    third.close()
    back = _read(folder)
    assert sorted(r["path"] for r in back) == sorted(rows)
    assert {r["path"]: r["threshold"] for r in back} == {
        k: r["threshold"] for k, r in changed.items()
    }
    assert "part-00000.parquet" in _stamps(folder)  # the unchanged first shard kept

    # a rerun from scratch (other settings, --no-resume): no row held, every shard goes
    ParquetShards(folder, {}, rows_per_shard=3).close()
    assert not list(folder.iterdir())


def test_without_pyarrow_parquet_says_how_to_install_it(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(RuntimeError, match=r'pip install "anomalens\[parquet\]"'):
        require_pyarrow()
    img = tmp_path / "in"
    img.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img / "a.png")
    argv = ["predict", "--method", "toy-zero", "--images", str(img), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"anomalens\[parquet\]"):
        main([*argv, "--parquet"])
    with pytest.raises(SystemExit, match="--parquet-rows needs --parquet"):
        main([*argv, "--parquet-rows", "5"])
    pairs = ["predict", "--method", "refdiff", "--pairs", str(tmp_path / "p.csv"), "--out", "o"]
    with pytest.raises(SystemExit, match="--parquet applies to --images and --manifest runs"):
        main([*pairs, "--parquet"])


def test_local_run_writes_shards_equal_to_results_csv_and_resumes(tmp_path: Path) -> None:
    normal, images = tmp_path / "normal", tmp_path / "images"
    normal.mkdir()
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 118 + 2 * i, np.uint8)).save(normal / f"n{i}.png")
    for i in range(7):
        im = np.full((32, 32, 3), 120, np.uint8)
        im[4:12, 4:12] = 255 if i % 3 == 0 else 121
        Image.fromarray(im).save(images / f"im{i}.png")
    (images / "broken.png").write_bytes(b"no image")
    paths = sorted(images.iterdir())
    out = tmp_path / "out"

    def run(**kw):
        return run_predict(
            lambda: create_detector("toy"), paths, out, normal_paths=sorted(normal.iterdir()),
            batch_size=2, progress=False, parquet_rows=3, **kw,
        )  # fmt: skip

    run()
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    back = _read(out / PARQUET_DIR)
    assert len(back) == len(csv_rows) == 7 and len({r["path"] for r in back}) == 7
    by_path = {r["path"]: r for r in back}
    for r in csv_rows:
        p = by_path[r["path"]]
        assert p["decision"] == r["decision"] and repr(p["score"]) == r["score"]
        assert p["overlay"] == r["overlay"] and p["mask"] == r["mask"]
    assert json.loads((out / "run.json").read_text())["parquet"] == {
        "folder": PARQUET_DIR, "rows_per_shard": 3, "shards": 3, "rows": 7,
    }  # fmt: skip

    # a killed run: the last shard and the last rows of results.jsonl lost
    jsonl = out / "results.jsonl"
    jsonl.write_text("".join(jsonl.read_text().splitlines(keepends=True)[:4]))
    (out / PARQUET_DIR / "part-00002.parquet").unlink()
    run()
    back = _read(out / PARQUET_DIR)
    assert sorted(r["path"] for r in back) == sorted(r["path"] for r in csv_rows)

    # a new threshold re-judges the stored scores: the shards follow
    run(threshold=ThresholdSpec(fixed=0.0))
    back = _read(out / PARQUET_DIR)
    assert len(back) == 7 and {r["decision"] for r in back} == {"anomalous"}


def test_local_grouped_run_writes_shards_per_group(tmp_path: Path) -> None:
    from anomalens.pipeline import run_predict_groups, split_by_group

    for group, level in (("dark", 60), ("light", 200)):
        for i in range(3):
            arr = np.full((32, 32, 3), level + i, np.uint8)
            for kind in ("normal", "images"):
                (tmp_path / kind / group).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(tmp_path / kind / group / f"{kind}{i}.png")
    normals = sorted((tmp_path / "normal").rglob("*.png"))
    images = sorted((tmp_path / "images").rglob("*.png"))
    out = tmp_path / "out"
    run_predict_groups(
        lambda: create_detector("toy"),
        split_by_group(tmp_path / "images", images),
        out,
        normal_groups=split_by_group(tmp_path / "normal", normals),
        progress=False,
        parquet_rows=2,
    )
    for group in ("dark", "light"):
        with open(out / group / "results.csv", newline="") as f:
            paths = sorted(r["path"] for r in csv.DictReader(f))
        assert sorted(r["path"] for r in _read(out / group / PARQUET_DIR)) == paths
        assert len(paths) == 3
    assert not (out / PARQUET_DIR).exists()  # per group only
