"""``--engine ray`` pieces that need no cluster: manifests, the install hint, refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from anomalens.cli.main import main
from anomalens.distributed.ray_predict import RayOptions, read_manifest, require_ray


def test_manifest_paths_relative_to_the_file_comments_and_blanks_skipped(tmp_path: Path) -> None:
    m = tmp_path / "sub" / "list.txt"
    m.parent.mkdir()
    m.write_text("# inputs\na.png\n\n  /abs/b.png  \nx/c.png\n", encoding="utf-8")
    assert read_manifest(m) == [m.parent / "a.png", Path("/abs/b.png"), m.parent / "x/c.png"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"# nothing\n\n", "no image path"), (b"a.png\x00\x01", "not a text file")],
)
def test_bad_manifest_is_refused_naming_the_file(tmp_path: Path, content: bytes, message: str):
    m = tmp_path / "m.txt"
    m.write_bytes(content)
    with pytest.raises(ValueError, match=message) as exc:
        read_manifest(m)
    assert str(m) in str(exc.value)
    with pytest.raises(FileNotFoundError, match=r"manifest .*missing\.txt: file not found"):
        read_manifest(tmp_path / "missing.txt")


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RuntimeError, match=r'pip install "anomalens\[ray\]"'):
        require_ray()
    img = tmp_path / "in"
    img.mkdir()
    (img / "a.png").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"anomalens\[ray\]"):
        main(["predict", "--method", "toy-zero", "--images", str(img), "--out",
              str(tmp_path / "o"), "--engine", "ray"])  # fmt: skip


def test_ray_flags_without_the_engine_and_bad_pool_sizes_are_refused(tmp_path) -> None:
    with pytest.raises(SystemExit, match="need --engine ray"):
        main(["predict", "--method", "toy-zero", "--images", str(tmp_path), "--out",
              str(tmp_path / "o"), "--workers", "3"])  # fmt: skip
    with pytest.raises(ValueError, match="--workers must be at least 1"):
        RayOptions(workers=0)
    with pytest.raises(ValueError, match="--gpus-per-worker"):
        RayOptions(gpus_per_worker=-1)


def test_batch_methods_are_refused_before_anything_is_fitted(tmp_path) -> None:
    pytest.importorskip("ray")
    from anomalens.distributed import run_predict_ray
    from anomalens.registry import create_detector

    with pytest.raises(ValueError, match="toy-batch scores each image against the whole batch"):
        run_predict_ray(lambda: create_detector("toy-batch"), [tmp_path / "a.png"], tmp_path)


def test_musc_with_image_views_is_refused_and_shard_size_checked(tmp_path) -> None:
    pytest.importorskip("ray")
    from anomalens.distributed import run_predict_ray
    from anomalens.geometry import ImageViews, with_views
    from anomalens.registry import create_detector

    def viewed():
        det = create_detector("musc", backbone="resnet18", weights="random", image_size=64)
        return with_views(det, ImageViews(tile=32))

    with pytest.raises(ValueError, match="distributes for MuSc only"):
        run_predict_ray(viewed, [tmp_path / "a.png"], tmp_path)
    with pytest.raises(ValueError, match="--shard-size must be at least 1"):
        RayOptions(shard_size=0)
    with pytest.raises(SystemExit, match="--shard-size need --engine ray"):
        main(["predict", "--method", "toy-zero", "--images", str(tmp_path), "--out",
              str(tmp_path / "o"), "--shard-size", "8"])  # fmt: skip


def test_manifest_feeds_a_local_run_with_unreadable_entries_in_errors(tmp_path) -> None:
    import csv

    import numpy as np
    from PIL import Image

    img = tmp_path / "in"
    img.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(img / f"a{i}.png")
    m = tmp_path / "list.txt"
    m.write_text("in/a0.png\nin/a2.png\nin/missing.png\n", encoding="utf-8")
    out = tmp_path / "o"
    assert (
        main(["predict", "--method", "toy-zero", "--manifest", str(m), "--out", str(out), "-q"])
        == 0
    )
    with open(out / "results.csv", newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(img / "a0.png"), str(img / "a2.png")]
    errors = (out / "errors.csv").read_text()
    assert "missing.png,file not found" in errors
    with pytest.raises(SystemExit, match="either --images DIR or --manifest FILE"):
        main(["predict", "--method", "toy-zero", "--manifest", str(m), "--images", str(img),
              "--out", str(out)])  # fmt: skip


def test_group_scorer_loads_each_group_model_once_and_splits_mixed_batches(monkeypatch):
    """The shared pool's actor: a model per group met, kept (LRU), never reloaded per batch."""
    import json

    import numpy as np

    from anomalens.distributed import ray_groups

    loads: list[str] = []

    class CountingScorer:
        def __init__(self, model, threshold, out, *rest) -> None:
            self.group = Path(out).name
            loads.append(self.group)

        def __call__(self, batch):
            return {"record": [json.dumps({"row": f"{self.group}/{n}"}) for n in batch["name"]]}

    monkeypatch.setattr(ray_groups, "_Scorer", CountingScorer)

    def batch(*items: str) -> dict:
        return {
            "path": np.array([b"x.png"] * len(items), dtype=object),
            "name": np.array([i.split("/")[1] for i in items]),
            "group": np.array([i.split("/")[0] for i in items]),
        }

    models = {"a": b"", "b": b""}
    scorer = ray_groups._GroupScorer(models, {"a": {}, "b": {}}, "/o", True, True, None, cache=2)
    out = scorer(batch("a/1", "a/2"))
    out = scorer(batch("a/3", "b/1", "b/2"))
    assert out["group"] == ["a", "b", "b"]
    assert [json.loads(r)["row"] for r in out["record"]] == ["a/3", "b/1", "b/2"]
    scorer(batch("b/3", "a/4"))
    assert loads == ["a", "b"]  # each model once, though batches mix groups
    loads.clear()
    one = ray_groups._GroupScorer(models, {"a": {}, "b": {}}, "/o", True, True, None, cache=1)
    for b in (batch("a/1"), batch("a/2"), batch("b/1"), batch("a/3")):
        one(b)
    assert loads == ["a", "b", "a"]  # a cache of one model: reloaded only after another group


def test_grouped_ray_run_refuses_a_group_without_normal_images_before_starting(tmp_path):
    ray = pytest.importorskip("ray")
    from anomalens.distributed import run_predict_groups_ray

    images = {"a": [tmp_path / "a" / "x.png"], "b": [tmp_path / "b" / "y.png"]}
    with pytest.raises(ValueError, match=r"no normal images for group\(s\) b"):
        run_predict_groups_ray(
            lambda: None, images, tmp_path / "out", normal_groups={"a": [tmp_path / "n.png"]}
        )
    assert not ray.is_initialized() and not (tmp_path / "out").exists()
