"""Pure scoring functions: kNN distances, re-weighted image score, coreset, upsample, blur."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from anomalens.scoring.coreset import coreset_size, greedy_coreset
from anomalens.scoring.knn import (
    knn,
    nearest_neighbor_distance,
    pairwise_l2,
    reweighted_image_score,
)
from anomalens.scoring.maps import gaussian_kernel1d, gaussian_smooth, upsample

# ----------------------------------------------------------------------------- kNN


def test_knn_matches_brute_force_with_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    q, m = torch.randn(53, 8, generator=g), torch.randn(31, 8, generator=g)
    ref = torch.cdist(q.double(), m.double())
    ref_d, ref_i = ref.sort(dim=1)
    for chunk in (1, 7, None):
        d, i = knn(q, m, k=3, chunk=chunk)
        torch.testing.assert_close(d.double(), ref_d[:, :3], atol=1e-5, rtol=1e-5)
        assert torch.equal(i, ref_i[:, :3])
    nn3 = nearest_neighbor_distance(q, m, k=3, chunk=5)
    torch.testing.assert_close(nn3.double(), ref_d[:, :3].mean(1), atol=1e-5, rtol=1e-5)
    nn1 = nearest_neighbor_distance(q, m)
    torch.testing.assert_close(nn1.double(), ref_d[:, 0], atol=1e-5, rtol=1e-5)


def test_knn_identical_points_give_zero_not_nan() -> None:
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(1)) * 100
    d = nearest_neighbor_distance(x, x)
    assert torch.isfinite(d).all()
    assert (d >= 0).all() and d.max() < 1e-2


def test_knn_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="feature sizes differ"):
        knn(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="k must be"):
        knn(torch.zeros(2, 3), torch.zeros(4, 3), k=5)
    with pytest.raises(ValueError, match="empty"):
        knn(torch.zeros(2, 3), torch.zeros(0, 3))


def _reweight_reference(scores: np.ndarray, q: np.ndarray, mem: np.ndarray, b: int) -> float:
    p = int(scores.argmax())
    d_q = np.linalg.norm(mem - q[p], axis=1)
    x = int(d_q.argmin())
    support = np.argsort(np.linalg.norm(mem - mem[x], axis=1), kind="stable")[:b]
    assert support[0] == x
    e = np.exp(d_q[support])
    return float((1 - e[0] / e.sum()) * scores[p])


def test_reweighted_image_score_matches_formula() -> None:
    g = torch.Generator().manual_seed(2)
    mem = torch.randn(40, 6, generator=g, dtype=torch.float64)
    q = torch.randn(2, 15, 6, generator=g, dtype=torch.float64)
    d, i = knn(q.reshape(-1, 6), mem)
    scores, idx = d[:, 0].reshape(2, 15), i[:, 0].reshape(2, 15)
    got = reweighted_image_score(scores, q, idx, mem, num_neighbors=5)
    for b in range(2):
        ref = _reweight_reference(scores[b].numpy(), q[b].numpy(), mem.numpy(), 5)
        assert got[b].item() == pytest.approx(ref, rel=1e-9)
    assert (got < scores.max(1).values).all() and (got > 0).all()
    # b = 1 is the plain max (anomalib convention)
    torch.testing.assert_close(
        reweighted_image_score(scores, q, idx, mem, num_neighbors=1), scores.max(1).values
    )


def test_pairwise_l2_is_euclidean() -> None:
    a, b = torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0]])
    torch.testing.assert_close(pairwise_l2(a, b), torch.tensor([[0.0], [5.0]]))


# ----------------------------------------------------------------------------- coreset


def _covering_radius(x: torch.Tensor, idx: torch.Tensor) -> float:
    return float(torch.cdist(x, x[idx]).min(dim=1).values.max())


def _clustered(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(600, 16, generator=g)
    centers = torch.eye(16)[:5] * 30.0
    small = torch.cat([c + 0.1 * torch.randn(3, 16, generator=g) for c in centers])
    return torch.cat([big, small])  # 5 far clusters of 3 points each at indices >= 600


def test_coreset_size_rules() -> None:
    assert coreset_size(1000, ratio=0.1) == 100
    assert coreset_size(5, ratio=0.1) == 1
    assert coreset_size(10, size=50) == 10
    with pytest.raises(ValueError, match="exactly one"):
        coreset_size(10)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        coreset_size(10, ratio=1.5)


def test_coreset_size_determinism_and_uniqueness() -> None:
    x = _clustered()
    a = greedy_coreset(x, ratio=0.05, seed=3)
    b = greedy_coreset(x, ratio=0.05, seed=3)
    assert a.shape == (math.floor(0.05 * len(x)),)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == len(a)
    assert torch.equal(greedy_coreset(x, ratio=1.0), torch.arange(len(x)))


def test_coreset_covers_far_clusters_better_than_random() -> None:
    x = _clustered()
    idx = greedy_coreset(x, size=12, seed=0, projection_dim=8)
    far = set(range(600, 615))
    hit_clusters = {(i - 600) // 3 for i in idx.tolist() if i in far}
    assert hit_clusters == set(range(5)), "every far cluster must be represented"
    r_core = _covering_radius(x, idx)
    g = torch.Generator().manual_seed(0)
    r_rand = min(_covering_radius(x, torch.randperm(len(x), generator=g)[:12]) for _ in range(20))
    assert r_core < 0.5 * r_rand


def test_coreset_without_projection_is_exact_greedy_k_center() -> None:
    x = torch.randn(80, 5, generator=torch.Generator().manual_seed(4))
    idx = greedy_coreset(x, size=10, seed=1, projection_dim=0)
    full = torch.cdist(x, x)
    chosen = [int(idx[0])]
    for _ in range(9):
        chosen.append(int(full[:, chosen].min(dim=1).values.argmax()))
    assert idx.tolist() == chosen


# ----------------------------------------------------------------------------- maps


@pytest.mark.parametrize(
    ("shape", "sigma"),
    [((2, 37, 50), 4.0), ((1, 10, 9), 4.0), ((3, 28, 28), 1.5), ((1, 5, 40), 0.7)],
)
def test_gaussian_smooth_matches_scipy(shape: tuple[int, int, int], sigma: float) -> None:
    rng = np.random.default_rng(0)
    maps = rng.random(shape) * 3.0
    ref = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in maps])
    got64 = gaussian_smooth(torch.from_numpy(maps), sigma).numpy()
    np.testing.assert_allclose(got64, ref, atol=1e-12)
    got32 = gaussian_smooth(torch.from_numpy(maps).float(), sigma).numpy()
    np.testing.assert_allclose(got32, ref, atol=1e-5)


def test_gaussian_kernel_radius_and_identity() -> None:
    assert gaussian_kernel1d(4.0).numel() == 33  # radius int(4 * 4 + 0.5) = 16
    assert gaussian_kernel1d(4.0).sum().item() == pytest.approx(1.0, abs=1e-6)
    x = torch.rand(1, 8, 8)
    assert gaussian_smooth(x, 0.0) is x
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        gaussian_smooth(torch.rand(8, 8))


def test_upsample_modes() -> None:
    x = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(0))
    up = upsample(x, 28)
    ref = F.interpolate(x[:, None], size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, ref)
    near = upsample(x, (14, 21), mode="nearest")
    assert near.shape == (2, 14, 21)
    torch.testing.assert_close(near[:, ::2, ::3], x)
    torch.testing.assert_close(
        upsample(torch.full((1, 4, 4), 2.5), 32), torch.full((1, 32, 32), 2.5)
    )
    assert upsample(x, 7) is x
    with pytest.raises(ValueError, match="mode"):
        upsample(x, 28, mode="area")
