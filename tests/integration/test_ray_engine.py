"""``predict --engine ray`` on a real two-node Ray cluster on this machine (1 CPU per node).

Checks: equal to the single-process run (scores within 1e-6, decisions, files), a scoring
worker killed mid-run still gives complete results (Ray restarts it and retries its batch),
a killed driver's run resumes with every input exactly once (results.jsonl and Parquet
shards), ``--groups`` on Ray equals the local grouped run, from normal images or from
per-group models, resuming a partial run, and MuSc scored in shards on both nodes equals
single-process MuSc (maps and scores within 1e-5, decisions, files).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from anomalens.cli.main import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
METHOD = ["--method", "patchcore", "--backbone", "resnet18", "--weights", "random"]
METHOD += ["--image-size", "64", "-q"]
MUSC = ["--method", "musc", "--backbone", "resnet18", "--weights", "random"]
MUSC += ["--image-size", "64", "-q"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head and one worker node on loopback, 1 CPU each; this process is connected to it."""
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield c.address
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("rayin")
    good, incoming = root / "good", root / "incoming"
    good.mkdir()
    incoming.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(100, 130, (64, 64, 3), dtype=np.uint8)).save(
            good / f"g{i}.png"
        )
    for i in range(24):
        im = rng.integers(100, 130, (64, 64, 3), dtype=np.uint8)
        if i % 6 == 0:
            im[20:40, 20:40] = 255
        Image.fromarray(im).save(incoming / f"im{i:02d}.png")
    (incoming / "broken.png").write_bytes(b"not an image")
    return good, incoming


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def _argv(folders: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    good, incoming = folders
    return ["predict", *METHOD, "--normal", str(good), "--images", str(incoming), "--out", str(out), *extra]  # fmt: skip


def _ray_workers() -> list[int]:
    """Ids of this test's scoring actor processes (descendants of this process only)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    mine = {os.getpid()}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                changed = True
    out = []
    for pid in mine:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::MapWorker"):
            out.append(pid)
    return out


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_ray_run_equals_the_single_process_run(cluster, folders, tmp_path) -> None:
    local, dist = tmp_path / "local", tmp_path / "ray"
    assert main(_argv(folders, local)) == 0
    assert main(_argv(folders, dist, "--engine", "ray", "--workers", "2", "--batch-size", "3")) == 0
    a, b = _rows(local), _rows(dist)
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 24
    for ra, rb in zip(a, b):
        assert abs(float(ra["score"]) - float(rb["score"])) <= 1e-6
        assert ra["decision"] == rb["decision"] and ra["overlay"] == rb["overlay"]
        assert ra["mask"] == rb["mask"] and ra["threshold"] == rb["threshold"]
    assert {r["decision"] for r in a} == {"normal", "anomalous"}
    assert _files(local) == _files(dist)
    assert (local / "errors.csv").read_text() == (dist / "errors.csv").read_text()
    assert "broken.png" in (dist / "errors.csv").read_text()
    for r in b:
        if r["mask"]:
            ma = np.asarray(Image.open(local / r["mask"]))
            mb = np.asarray(Image.open(dist / r["mask"]))
            assert (ma != mb).mean() < 1e-3  # maps equal to float rounding
    run = json.loads((dist / "run.json").read_text())
    assert run["status"] == "complete" and run["engine"]["name"] == "ray"
    assert run["settings"] == json.loads((local / "run.json").read_text())["settings"]


def test_a_worker_killed_mid_run_still_gives_complete_results(cluster, folders, tmp_path):
    out = tmp_path / "killed"
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            workers = _ray_workers()
            if workers and _lines(out / "results.jsonl") >= 1:
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
                return
            time.sleep(0.02)

    t = threading.Thread(target=kill_one_worker)
    t.start()
    code = main(_argv(folders, out, "--engine", "ray", "--workers", "2", "--batch-size", "1"))
    t.join()
    assert code == 0 and killed, "no scoring worker was running to be killed"
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(
        str(p) for p in folders[1].glob("im*.png")
    )  # every input exactly once
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == len({x["path"] for x in lines}) == 24


def _parquet_paths(out: Path) -> list[str]:
    """Paths of every row of the Parquet shards in ``out``, in shard order (duplicates kept)."""
    import pyarrow.parquet as pq

    shards = sorted((out / "results.parquet").glob("part-*.parquet"))
    return [p for s in shards for p in pq.read_table(s).column("path").to_pylist()]


def test_a_killed_driver_resumes_with_every_input_once(cluster, folders, tmp_path) -> None:
    out = tmp_path / "resumed"
    argv = _argv(folders, out, "--engine", "ray", "--workers", "1", "--batch-size", "1")
    argv += ["--parquet", "--parquet-rows", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomalens", *argv, "--ray-address", cluster],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    jsonl = out / "results.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _lines(jsonl) < 2 and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    before = _lines(jsonl)
    assert 2 <= before < 24, f"driver not caught mid-run ({before} rows written)"
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert main([*argv, "--ray-address", cluster]) == 0
    rows = _rows(out)
    assert len(rows) == len({r["path"] for r in rows}) == 24
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(lines) == 24  # the earlier rows kept, the rest added once
    assert sorted(_parquet_paths(out)) == sorted(r["path"] for r in rows)  # each row once


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two products (grey ~60 and ~190): 3 normal images and 5 to inspect each, 1 unreadable."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("raygroups")
    for group, level in (("dark", 60), ("light", 190)):
        for i in range(3):
            im = rng.integers(level - 10, level + 10, (64, 64, 3), dtype=np.uint8)
            (root / "normal" / group).mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(root / "normal" / group / f"g{i}.png")
        for i in range(5):
            im = rng.integers(level - 10, level + 10, (64, 64, 3), dtype=np.uint8)
            if i % 2 == 0:
                im[20:40, 20:40] = 255 - level
            (root / "images" / group).mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(root / "images" / group / f"im{i}.png")
    (root / "images" / "dark" / "broken.png").write_bytes(b"not an image")
    return root / "normal", root / "images"


def _same_grouped_results(a: Path, b: Path) -> None:
    """Two grouped runs' outputs are equal: rows, files, errors. Scores within 1e-6, relative
    above 1 (these reach ~6.5, where float32 steps are 5e-7 and batches are cut differently)."""
    ra, rb = _rows(a), _rows(b)
    assert [(r["group"], r["path"]) for r in ra] == [(r["group"], r["path"]) for r in rb]
    assert len(ra) == 10 and {r["decision"] for r in ra} == {"normal", "anomalous"}
    for x, y in zip(ra, rb):
        assert math.isclose(float(x["score"]), float(y["score"]), rel_tol=1e-6, abs_tol=1e-6)
        assert (x["decision"], x["threshold"], x["overlay"], x["mask"]) == (
            y["decision"], y["threshold"], y["overlay"], y["mask"],
        )  # fmt: skip
    parquet = {f for f in _files(b) if "results.parquet/" in f}
    assert _files(a) == _files(b) - parquet
    for group in ("dark", "light"):
        assert (a / group / "errors.csv").read_text() == (b / group / "errors.csv").read_text()
        run_a = json.loads((a / group / "run.json").read_text())
        run_b = json.loads((b / group / "run.json").read_text())
        assert run_b["status"] == "complete" and run_b["engine"]["name"] == "ray"
        assert run_a["settings"] == run_b["settings"] and run_a["threshold"] == run_b["threshold"]
    assert "broken.png" in (b / "dark" / "errors.csv").read_text()
    assert (b / "index.html").is_file()


def test_groups_on_ray_equal_the_local_grouped_run(cluster, grouped, tmp_path) -> None:
    normal, images = grouped
    argv = ["predict", *METHOD, "--groups", "--normal", str(normal), "--images", str(images)]
    local, dist = tmp_path / "local", tmp_path / "ray"
    assert main([*argv, "--out", str(local)]) == 0
    ray_flags = ["--engine", "ray", "--workers", "2", "--batch-size", "2"]
    assert main([*argv, "--out", str(dist), *ray_flags, "--parquet", "--parquet-rows", "2"]) == 0
    _same_grouped_results(local, dist)
    for group in ("dark", "light"):  # the shards hold the group's rows of results.csv, once
        rows = {r["path"]: r for r in _rows(dist / group)}
        assert sorted(_parquet_paths(dist / group)) == sorted(rows)
        import pyarrow.dataset as pds

        for r in pds.dataset(dist / group / "results.parquet").to_table().to_pylist():
            assert repr(r["score"]) == rows[r["path"]]["score"]
            assert r["decision"] == rows[r["path"]]["decision"]


def test_groups_on_ray_from_models_resume_a_partial_run(cluster, grouped, tmp_path) -> None:
    """``predict --model DIR --groups --engine ray`` loads each group's model in a task and
    resumes a grouped run left half done (here by a local run): rows kept, the rest scored."""
    normal, images = grouped
    models = tmp_path / "models"
    fit = ["fit", *METHOD[:-1], "--normal", str(normal), "--groups", "--out", str(models)]
    assert main(fit) == 0
    argv = ["predict", "--model", str(models), "--groups", "--images", str(images), "-q"]
    local, dist = tmp_path / "local", tmp_path / "ray"
    assert main([*argv, "--out", str(local)]) == 0
    shutil.copytree(local, dist)
    jsonl = dist / "dark" / "results.jsonl"
    kept = jsonl.read_text().splitlines(keepends=True)[:2]
    jsonl.write_text("".join(kept))
    (dist / "light" / "results.jsonl").unlink()
    overlay = dist / "dark" / json.loads(kept[0])["overlay"]
    stamp = overlay.stat().st_mtime_ns
    assert main([*argv, "--out", str(dist), "--engine", "ray", "--workers", "2", "--parquet"]) == 0
    _same_grouped_results(local, dist)
    assert overlay.stat().st_mtime_ns == stamp  # a resumed row is not scored again
    for group in ("dark", "light"):
        assert sorted(_parquet_paths(dist / group)) == sorted(
            r["path"] for r in _rows(dist / group)
        )


def test_benchmark_grid_on_ray_equals_the_local_grid_and_resumes(cluster, tmp_path) -> None:
    from anomalens.data.synthetic import generate_synthetic_dataset, list_synthetic_categories

    cat = list_synthetic_categories()[0]
    root = generate_synthetic_dataset(
        tmp_path / "synth", categories=[cat], n_train=4, n_test_good=3, n_test_defect=3,
        image_size=64, seed=0,
    )  # fmt: skip
    grid = ["benchmark", *METHOD, "--dataset", "mvtec", "--root", str(root), "--shots", "1", "2"]
    grid += ["--seeds", "10", "20"]
    assert main([*grid, "--out", str(tmp_path / "local")]) == 0
    dist = tmp_path / "ray"
    assert main([*grid, "--out", str(dist), "--engine", "ray", "--workers", "2"]) == 0

    def table(out: Path) -> list[dict[str, str]]:
        with open(out / "results.csv", newline="") as f:
            return [
                {k: v for k, v in r.items() if "seconds" not in k and "per_image" not in k}
                for r in csv.DictReader(f)
            ]

    assert len(table(dist)) == 4 and table(dist) == table(tmp_path / "local")
    jobs = sorted((dist / "jobs").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in jobs]
    assert main([*grid, "--out", str(dist), "--engine", "ray"]) == 0  # all cells finished
    assert [p.stat().st_mtime_ns for p in jobs] == stamps


@pytest.fixture(scope="module")
def musc_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 striped textures in good/ and crack/ (red squares at other places) + a broken file."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("muscin")
    xx = np.mgrid[0:64, 0:64][1]
    for i in range(12):
        folder = root / ("good" if i < 8 else "crack")
        folder.mkdir(exist_ok=True)
        base = 128 + 40 * np.sin(xx / 3.0 + rng.uniform(0, 0.3)) + rng.normal(0, 4, (64, 64))
        im = np.repeat(base[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)
        if i >= 8:
            y = 8 + 10 * (i - 8)
            im[y : y + 14, 40 - 6 * (i - 8) : 54 - 6 * (i - 8)] = [250, 30, 30]
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    (root / "good" / "broken.png").write_bytes(b"not an image")
    return root


def test_musc_on_ray_equals_the_single_process_run(cluster, musc_folder, tmp_path) -> None:
    """5 shards of 3 inputs on two 1-CPU nodes: every shard scored against every shard."""
    local, dist = tmp_path / "local", tmp_path / "ray"
    argv = ["predict", *MUSC, "--images", str(musc_folder), "--recursive"]
    assert main([*argv, "--out", str(local)]) == 0
    ray_flags = ["--engine", "ray", "--workers", "2", "--shard-size", "3"]
    assert main([*argv, "--out", str(dist), *ray_flags]) == 0
    a, b = _rows(local), _rows(dist)
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 12
    for ra, rb in zip(a, b):
        assert abs(float(ra["score"]) - float(rb["score"])) <= 1e-5
        assert ra["decision"] == rb["decision"] and ra["overlay"] == rb["overlay"]
        assert ra["mask"] == rb["mask"]
        assert abs(float(ra["threshold"]) - float(rb["threshold"])) <= 1e-5
    assert {r["decision"] for r in a} == {"normal", "anomalous"}
    for m in sorted((local / "maps").glob("*.npy")):
        assert np.abs(np.load(m) - np.load(dist / "maps" / m.name)).max() <= 1e-5
    assert _files(local) == _files(dist)  # the shards' scratch folder is gone
    assert (local / "errors.csv").read_text() == (dist / "errors.csv").read_text()
    assert "broken.png" in (dist / "errors.csv").read_text()
    run, ref = (json.loads((d / "run.json").read_text()) for d in (dist, local))
    assert run["status"] == "complete" and run["engine"]["shard_size"] == 3
    assert run["settings"] == ref["settings"] and run["scored_batch"] == ref["scored_batch"]
    assert run["threshold"]["value"] == pytest.approx(ref["threshold"]["value"], abs=1e-5)
    assert run["threshold"]["pixel_value"] == pytest.approx(
        ref["threshold"]["pixel_value"], abs=1e-5
    )
