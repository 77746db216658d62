"""MuSc scored in shards (the work of ``--engine ray``) without Ray: block combination, and
the sharded stages run in this process against ``MuSc.predict`` on the same images."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import anomalens.thresholds
from anomalens.detectors.musc import MuSc
from anomalens.distributed.musc_shards import (
    WORK_DIR,
    default_shard_size,
    local_runner,
    score_shards,
)
from anomalens.pipeline import batch_threshold
from anomalens.scoring.musc import MutualScoreBlocks, merge_smallest, mutual_scores, nn_distances


def _unit(n: int, length: int = 6, c: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, length, c, generator=g)
    return z / z.norm(dim=-1, keepdim=True)


def _blocked(z: torch.Tensor, queries: list[int], refs: list[list[int]], **kw) -> torch.Tensor:
    acc = MutualScoreBlocks(queries, z.shape[0], **kw)
    for block in refs:
        acc.add(nn_distances(z[queries], z[block]), block)
    return acc.scores()


def test_merge_smallest_keeps_the_smallest_of_the_union() -> None:
    a = torch.tensor([[[5.0, 1.0, 9.0]]])
    b = torch.tensor([[[2.0, 8.0]]])
    kept = merge_smallest(merge_smallest(None, a, 3), b, 3)
    assert sorted(kept.flatten().tolist()) == [1.0, 2.0, 5.0]
    assert merge_smallest(None, b, 3).shape[-1] == 2  # fewer than k: all kept


@pytest.mark.parametrize("topmin", [(0.0, 0.3), (0.1, 0.6), (0.0, 1.0)])
def test_blocks_in_any_split_and_order_equal_mutual_scores(topmin) -> None:
    n = 13
    z = _unit(n, seed=1)
    full = mutual_scores(z, *topmin)
    rng = random.Random(0)
    for _ in range(4):
        ids = list(range(n))
        rng.shuffle(ids)
        cuts = sorted(rng.sample(range(1, n), 3))
        refs = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
        queries = sorted(rng.sample(range(n), 5))
        got = _blocked(z, queries, refs, topmin_min=topmin[0], topmin_max=topmin[1])
        torch.testing.assert_close(got, full[queries], atol=1e-6, rtol=0)


def test_a_dropped_or_repeated_block_is_refused() -> None:
    """The combination cannot silently drop or double-count a reference block."""
    z = _unit(9, seed=2)
    refs = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="a block is missing"):
        _blocked(z, [0, 4], refs[:2])
    with pytest.raises(ValueError, match="given twice"):
        _blocked(z, [0, 4], [*refs, refs[1]])
    with pytest.raises(ValueError, match="given twice"):
        _blocked(z, [0, 4], [[0, 1, 1], refs[1], refs[2]])
    # what the guards protect: with a block counted twice the kept distances are others
    acc = MutualScoreBlocks([0, 4], 9, 0.0, 0.5)
    for block in [*refs, refs[1]]:
        acc.seen.difference_update(block)  # bypass the guard
        acc.add(nn_distances(z[[0, 4]], z[block]), block)
    assert not torch.allclose(acc.scores(), mutual_scores(z, 0.0, 0.5)[[0, 4]])


def _images(root: Path, n_good: int = 8, n_crack: int = 4) -> list[Path]:
    rng = np.random.default_rng(0)
    xx = np.mgrid[0:64, 0:64][1]
    paths = []
    for i in range(n_good + n_crack):
        folder = root / ("good" if i < n_good else "crack")
        folder.mkdir(parents=True, exist_ok=True)
        base = 128 + 40 * np.sin(xx / 3.0 + rng.uniform(0, 0.3)) + rng.normal(0, 4, (64, 64))
        im = np.repeat(base[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)
        if i >= n_good:
            im[16 + 4 * (i - n_good) : 30, 20:36] = [250, 30, 30]
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(im).save(paths[-1])
    return paths


def _musc(**kw) -> MuSc:
    from anomalens.backbones.tiny import make_tiny_clip

    clip = make_tiny_clip(seed=0, image_size=64)
    options = {"image_size": 64, "layers": (2, 4), "r": (1, 3), "chunk_size": 2, "batch_size": 2}
    return MuSc(backbone=clip, **{**options, **kw})


@pytest.mark.parametrize(("divide_num", "shard_size"), [(1, 3), (1, 4), (2, 5)])
def test_sharded_musc_equals_single_process(tmp_path, monkeypatch, divide_num, shard_size):
    """Scores, RsCIN, subsets and the batch-robust threshold (pixels sampled from maps held in
    different shards) equal ``MuSc.predict`` on the readable images."""
    monkeypatch.setattr(anomalens.thresholds, "PIXEL_SAMPLE_SIZE", 20_000)  # < 12 x 64 x 64
    paths = sorted(_images(tmp_path / "in"))
    broken = tmp_path / "in" / "good" / "004b.png"
    broken.write_bytes(b"not an image")
    inputs = sorted([*paths, broken])
    det = _musc(divide_num=divide_num)
    work = tmp_path / "out" / WORK_DIR
    scored = score_shards(det, inputs, work, shard_size, local_runner(det))
    assert [e["path"] for e in scored.errors] == [str(broken)]
    batch = [p for p in inputs if p != broken]
    ref = det.predict(batch, groups=[p.parent.name for p in batch])
    torch.testing.assert_close(
        torch.from_numpy(scored.raw), ref.extras["score_before_rscin"], atol=1e-6, rtol=0
    )
    assert np.abs(scored.scores - ref.image_score.numpy()).max() <= 1e-6
    got = torch.cat(
        [load_file(str(f))["patch"] for f in sorted((work / "scores").glob("*.safetensors"))]
    )
    torch.testing.assert_close(got, ref.extras["patch_map"].double(), atol=1e-6, rtol=0)
    want = batch_threshold(ref.image_score.numpy(), ref.anomaly_map.numpy())
    thr = batch_threshold(scored.scores, pixels=scored.pixels)
    assert thr.value == pytest.approx(want.value, abs=1e-6)
    assert thr.pixel_value == pytest.approx(want.pixel_value, abs=1e-6)
    assert thr.vis_range == pytest.approx(want.vis_range, abs=1e-6)
    if divide_num > 1:
        assert ref.extras["subset"].unique().numel() == 2


def test_finished_shards_are_reused_and_other_settings_start_afresh(tmp_path, caplog) -> None:
    paths = sorted(_images(tmp_path / "in", 5, 2))
    det = _musc()
    work = tmp_path / WORK_DIR
    run = local_runner(det)

    first = score_shards(det, paths, work, 3, run)
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*.safetensors")}
    caplog.set_level("INFO", logger="anomalens.distributed.musc_shards")
    again = score_shards(det, paths, work, 3, run)
    assert "reused the features of 3 and the scores of 3 of 3 shards" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.safetensors")} == stamps
    assert np.array_equal(first.scores, again.scores)
    score_shards(_musc(r=(1,)), paths, work, 3, run)  # other settings: recomputed
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.safetensors")} != stamps


def test_default_shard_size_two_per_worker_in_whole_backbone_batches() -> None:
    assert default_shard_size(100, 2, 4) == 28  # 25 -> 28
    assert default_shard_size(3, 4, 1) == 1
