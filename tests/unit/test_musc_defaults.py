"""MuSc defaults that fit the backbone, a cost estimate with a budget, and the batch-robust
threshold's assumption checked."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from test_musc import PixelPatches, _textures

from anomalens.detectors.musc import MuSc, musc_cost, musc_shard_cost
from anomalens.thresholds import batch_robust_threshold, check_mostly_normal

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
MOBILENET = SHARED / "weights" / "mobilenet_v2_imagenet_int8dequant.safetensors"


def test_working_size_follows_the_backbone() -> None:
    from anomalens.backbones.tiny import make_tiny_clip

    assert MuSc(backbone=PixelPatches()).image_size == 518  # CLIP-style default
    clip = make_tiny_clip(seed=0, image_size=64)
    assert MuSc(backbone=clip, layers=(2, 4)).image_size == 64  # the given backbone's own
    if not MOBILENET.is_file():
        pytest.skip(f"needs {MOBILENET} (the team's shared/ folder)")
    cnn = MuSc(backbone="mobilenet_v2_tf", weights=str(MOBILENET))
    assert cnn.image_size == 224  # the CNN preset's native size, not 518
    assert (
        MuSc(backbone="mobilenet_v2_tf", weights=str(MOBILENET), image_size=320).image_size == 320
    )


def test_musc_cost_counts_pairs_tokens_and_maps() -> None:
    one = musc_cost([10], [(16, 8)], 3, 4, 4, 32, 100.0)
    assert one["msm_flops"] == 2 * 3 * 100 * 16 * 16 * 8
    assert one["flops"] == one["msm_flops"] + 10 * 100.0
    assert one["memory_bytes"] == 10 * 16 * 8 * 4 * 2 + 10 * (32 * 32 * 4 + 16 * 8 * 4)
    # two subsets of 5: half the pairs of one batch of 10, the tokens of 5 images at a time
    two = musc_cost([5, 5], [(16, 8)], 3, 4, 4, 32, 100.0)
    assert two["msm_flops"] == one["msm_flops"] / 2
    assert two["memory_bytes"] < one["memory_bytes"]


def test_batch_over_budget_is_refused_unless_forced(caplog: pytest.LogCaptureFixture) -> None:
    images = _textures(6)
    det = MuSc(backbone=PixelPatches(), image_size=64, budget_s=1e-9)
    est = det.estimate_cost([6])
    assert est["seconds"] > 0 and est["memory_gb"] > 0
    with pytest.raises(ValueError, match=r"exceeds the time budget.*force=true"):
        det.predict(images)
    det = MuSc(backbone=PixelPatches(), image_size=64, budget_gb=1e-9)
    with pytest.raises(ValueError, match="memory budget"):
        det.predict(images)
    forced = MuSc(backbone=PixelPatches(), image_size=64, budget_s=1e-9, force=True)
    with pytest.warns(UserWarning, match="running anyway"):
        assert forced.predict(images).image_score.shape == (6,)
    with caplog.at_level(logging.INFO, logger="anomalens.detectors.musc"):
        MuSc(backbone=PixelPatches(), image_size=64).predict(images)
    assert "rough estimate" in caplog.text
    with pytest.raises(ValueError, match="budget"):
        MuSc(backbone=PixelPatches(), budget_s=0)


def test_mostly_normal_batch_passes_the_check() -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(1.0, 0.05, 36), [2.0, 2.1, 2.2, 2.3]])
    thr = batch_robust_threshold(scores, np.zeros((40, 4, 4)))
    assert "warning" not in thr.details
    assert thr.details["assumes"].startswith("mostly normal batch")
    assert thr.details["assumption_check"]["flagged_fraction"] == pytest.approx(0.1)


def test_largely_defective_batch_warns(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    # 16 normal, 24 defective: the median sits in the defect group and MAD spans both
    scores = np.concatenate([rng.normal(1.0, 0.05, 16), rng.normal(1.6, 0.08, 24)])
    with caplog.at_level(logging.WARNING, logger="anomalens.thresholds"):
        thr = batch_robust_threshold(scores, np.zeros((40, 4, 4)))
    flagged = int((scores > thr.value).sum())
    assert flagged == 0  # the failure the check is for
    assert "largely defective" in thr.details["warning"]
    assert thr.details["assumption_check"]["high_group_fraction"] == pytest.approx(0.6)
    assert "two separate groups" in caplog.text


def test_nothing_flagged_is_reported_as_undecidable() -> None:
    # one Gaussian group: all normal, or largely defective with overlapping scores
    scores = 0.4 + 0.1 * np.linspace(-1.5, 1.5, 40)
    thr = batch_robust_threshold(scores, np.zeros((40, 4, 4)))
    assert not (scores > thr.value).any()
    assert "no image of 40 lies beyond it" in thr.details["warning"]
    assert "cannot tell an all-normal batch" in thr.details["warning"]


def test_too_many_flagged_warns() -> None:
    scores = np.r_[np.ones(10), np.linspace(2, 3, 10)]
    check = check_mostly_normal(scores, 1.5)
    assert check["flagged_fraction"] == 0.5 and "10 of 20 images lie beyond it" in check["warning"]
    assert "warning" not in check_mostly_normal(np.linspace(0, 1, 5), 0.9)  # too few to judge


def test_musc_shard_cost_kept_distances_and_data_moved() -> None:
    """Shard of 4 images in a batch of 101: kept = 4 x 16 x 30 float32; tokens of the batch
    written once (101 x 2 layers x 16 x 8 x 2 bytes) and read once per r."""
    cost = musc_shard_cost(4, 101, [(16, 8), (4, 8)], 3, 2, 4, 32, 2)
    assert cost["kept_bytes"] == 4 * 16 * 30 * 4
    assert cost["features_bytes"] == 101 * (16 * 8 + 4 * 8) * 2
    assert cost["read_bytes"] == 3 * cost["features_bytes"]
    bigger = musc_shard_cost(8, 101, [(16, 8), (4, 8)], 3, 2, 4, 32, 2)
    assert bigger["memory_bytes"] > cost["memory_bytes"]
