"""Unit tests of the MuSc scoring stages (anomalens.scoring.musc) on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anomalens.scoring.musc import (
    divide_subsets,
    fuse_scores,
    interval_bounds,
    lnamd,
    max_scores,
    minmax_normalize,
    mutual_scores,
    nn_distances,
    rscin,
    upsample_maps,
)
from anomalens.scoring.musc import lnamd_unnormalized as lnamd_raw


def _lnamd_reference(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Loop version from the method description: whole-map LayerNorm, unfold r x r x C patches,
    channel-major flattening averaged per channel (zero padding in the divisor), L2 norm."""
    b, n, c = tokens.shape
    h, w = grid
    out = torch.empty(b, n, c, dtype=torch.float64)
    for i in range(b):
        x = tokens[i].double().T.reshape(c, h, w)
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)
        pad = (r - 1) // 2
        xp = F.pad(x, (pad, pad, pad, pad))
        patches = F.unfold(xp[None], r)[0].T  # (h*w, c*r*r), channel-major
        agg = patches.reshape(n, c, r * r).sum(-1) / (r * r)
        out[i] = agg / agg.norm(dim=-1, keepdim=True)
    return out


def _msm_reference(z: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Brute-force MSM in float64: for each (i, p), NN distance to every other image."""
    n, length, _ = z.shape
    out = torch.empty(n, length, dtype=torch.float64)
    for i in range(n):
        d = []
        for j in range(n):
            if j == i:
                continue
            diff = z[i].double()[:, None, :] - z[j].double()[None, :, :]
            d.append(diff.norm(dim=-1).amin(dim=1))
        dd = torch.stack(d, dim=1).sort(dim=1).values
        out[i] = dd[:, lo:hi].mean(dim=1)
    return out


@pytest.mark.parametrize("r", [1, 3, 5])
def test_lnamd_matches_unfold_reference(r: int) -> None:
    g = torch.Generator().manual_seed(r)
    tokens = torch.randn(3, 6 * 5, 7, generator=g) * 3 + 1
    got = lnamd(tokens, (6, 5), r)
    ref = _lnamd_reference(tokens, (6, 5), r)
    assert got.shape == (3, 30, 7)
    torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3, 30), atol=1e-6, rtol=0)


def test_lnamd_is_per_image_and_whole_map() -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 16, 4, generator=g)
    scaled = tokens.clone()
    scaled[1] = scaled[1] * 10 + 5  # affine change of one whole map: removed by the LayerNorm
    torch.testing.assert_close(
        lnamd(scaled, (4, 4), 3), lnamd(tokens, (4, 4), 3), atol=1e-5, rtol=0
    )
    # per-token LayerNorm would differ: scaling one token changes the whole-map statistics
    bumped = tokens.clone()
    bumped[0, 0] *= 4
    assert not torch.allclose(lnamd(bumped, (4, 4), 1)[0, 5], lnamd(tokens, (4, 4), 1)[0, 5])


def test_lnamd_padding_divisor_cancels() -> None:
    tokens = torch.randn(1, 25, 3, generator=torch.Generator().manual_seed(1))
    raw = lnamd_raw(tokens, (5, 5), 3)
    x = F.layer_norm(tokens.transpose(1, 2).reshape(1, 3, 5, 5), (3, 5, 5))
    excl = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False).reshape(1, 3, 25).transpose(1, 2)
    torch.testing.assert_close(
        raw[0, 0] / raw[0, 0].norm(), excl[0, 0] / excl[0, 0].norm(), atol=1e-6, rtol=0
    )
    # the corner sums 4 of 9 positions: with zero padding the divisor stays 9
    torch.testing.assert_close(raw[0, 0] * 9 / 4, excl[0, 0], atol=1e-6, rtol=0)


def test_lnamd_rejects_bad_arguments() -> None:
    tokens = torch.randn(1, 16, 3)
    with pytest.raises(ValueError, match="odd"):
        lnamd(tokens, (4, 4), 2)
    with pytest.raises(ValueError, match="grid"):
        lnamd(tokens, (4, 5), 1)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(2, (0, 1)), (3, (0, 1)), (4, (0, 1)), (5, (0, 1)), (8, (0, 2)), (11, (0, 3)), (200, (0, 59))],
)
def test_interval_bounds_default(n: int, expected: tuple[int, int]) -> None:
    assert interval_bounds(n - 1) == expected


def test_interval_bounds_general_form_and_errors() -> None:
    assert interval_bounds(10, 0.1, 0.5) == (1, 5)
    assert interval_bounds(10, 2, 4) == (2, 4)  # values >= 1 are counts
    assert interval_bounds(3, 0.9, 0.95) == (2, 3)  # clamped inside [0, N-1)
    with pytest.raises(ValueError, match="at least 2 images"):
        interval_bounds(0)
    with pytest.raises(ValueError, match="topmin"):
        interval_bounds(5, 0.5, 0.3)


def test_nn_distances_brute_force() -> None:
    g = torch.Generator().manual_seed(2)
    q, ref = torch.randn(2, 5, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    got = nn_distances(q, ref)
    exp = (q[:, :, None, None, :] - ref[None, None]).norm(dim=-1).amin(dim=-1)
    assert got.shape == (2, 5, 4)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13])
def test_mutual_scores_brute_force(n: int) -> None:
    z = F.normalize(torch.randn(n, 9, 6, generator=torch.Generator().manual_seed(n)), dim=-1)
    lo, hi = interval_bounds(n - 1)
    got = mutual_scores(z)
    assert got.dtype == torch.float32 and got.shape == (n, 9)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _msm_reference(z, lo, hi), atol=2e-6, rtol=0)


@pytest.mark.parametrize(("qc", "rc"), [(1, 1), (2, 3), (3, 1), (4, 7), (5, 2), (11, 11)])
def test_mutual_scores_chunked_equals_unchunked(qc: int, rc: int) -> None:
    z = F.normalize(torch.randn(11, 30, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    full = mutual_scores(z)
    chunked = mutual_scores(z, query_chunk=qc, ref_chunk=rc)
    assert (chunked - full).abs().max().item() <= 1e-6


def test_mutual_scores_interval_options() -> None:
    z = F.normalize(torch.randn(9, 4, 5, generator=torch.Generator().manual_seed(4)), dim=-1)
    torch.testing.assert_close(
        mutual_scores(z, 0.25, 0.75).double(), _msm_reference(z, 2, 6), atol=2e-6, rtol=0
    )
    with pytest.raises(ValueError, match="chunk"):
        mutual_scores(z, query_chunk=0)
    with pytest.raises(ValueError, match="at least 2 images"):
        mutual_scores(z[:1])


def test_mutual_scores_flags_the_odd_patch() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(16, 8, generator=g)
    z = base[None].repeat(7, 1, 1) + 0.01 * torch.randn(7, 16, 8, generator=g)
    z[3, 10] = torch.randn(8, generator=g) * 3  # one anomalous patch in image 3
    s = mutual_scores(F.normalize(z, dim=-1))
    assert s.flatten().argmax().item() == 3 * 16 + 10


def test_fuse_scores_means_layers_then_r() -> None:
    s = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    out = fuse_scores(s)
    assert out.dtype == torch.float64 and out.shape == (4, 5)
    torch.testing.assert_close(out, s.double().mean(dim=(0, 1)))


def test_upsample_align_corners_and_max() -> None:
    m = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]], dtype=torch.float64)
    up = upsample_maps(m, 5)
    assert up.shape == (1, 5, 5)
    assert up[0, 0, 0] == 0 and up[0, -1, -1] == 3 and up[0, 0, -1] == 1  # corners kept
    torch.testing.assert_close(up[0, 2, 2], torch.tensor(1.5, dtype=torch.float64))
    assert max_scores(up).tolist() == [3.0]


def test_minmax_normalize_edges() -> None:
    torch.testing.assert_close(
        minmax_normalize(torch.tensor([1.0, 3.0, 2.0])), torch.tensor([0, 1, 0.5])
    )
    assert minmax_normalize(torch.full((4,), 0.7)).tolist() == [0, 0, 0, 0]


def test_rscin_hand_example() -> None:
    s = torch.tensor([0.0, 1.0, 0.5])
    a = math.sqrt(0.5)
    g = torch.tensor([[1.0, 0.0], [a, a], [0.0, 1.0]])  # cos(0,1)=cos(1,2)=a, cos(0,2)=0
    torch.testing.assert_close(rscin(s, g, [1]), torch.tensor([0.0, 1.0, 0.5]))
    # k = 2: image 0 -> {0, 1}, image 1 -> {1, tie 0/2: one of them}, image 2 -> {2, 1}
    k2 = rscin(s, g, [2])
    torch.testing.assert_close(k2[0], torch.tensor(a / (1 + a)))
    torch.testing.assert_close(k2[2], torch.tensor((0.5 + a) / (1 + a)))
    k3 = rscin(s, g, [3])  # k clamped to N = 3: row 0 weights (1, a, 0)
    torch.testing.assert_close(k3[0], torch.tensor(a / (1 + a)))
    torch.testing.assert_close(k3[1], torch.tensor((1 + a * 0.5) / (1 + 2 * a)))
    torch.testing.assert_close(rscin(s, g, [1, 3]), (rscin(s, g, [1]) + k3) / 2)


def test_rscin_disabled_and_errors() -> None:
    s = torch.tensor([3.0, 5.0], dtype=torch.float64)
    g = torch.eye(2)
    assert rscin(s, g, [0, 2]).tolist() == [3.0, 5.0]
    assert rscin(s, g, []).dtype == torch.float32
    with pytest.raises(ValueError, match="same N"):
        rscin(s, torch.eye(3))


def test_divide_subsets_official_rule() -> None:
    """Sorted groups, one seeded shuffle stream, subset t = every divide_num-th from t."""
    import random

    groups = ["good"] * 7 + ["crack"] * 2 + ["hole"]
    subsets = divide_subsets(groups, 3, seed=42)
    rng = random.Random(42)
    crack, good, hole = [7, 8], list(range(7)), [9]
    for part in (crack, good, hole):  # sorted group names
        rng.shuffle(part)
    expected = [crack[t::3] + good[t::3] + hole[t::3] for t in range(3)]
    assert subsets == expected
    assert sorted(i for s in subsets for i in s) == list(range(10))
    assert divide_subsets(groups, 3, seed=42) == subsets  # deterministic
    assert divide_subsets(groups, 3, seed=7) != subsets
    assert divide_subsets(groups, 1) == [list(range(10))]
    assert [len(s) for s in divide_subsets(["a", "a"], 4)] == [1, 1, 0, 0]  # first subsets only
    with pytest.raises(ValueError, match="divide_num"):
        divide_subsets(groups, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_nn_distances_close_to_cdist(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 20, 32, generator=gen), dim=-1)
    r = F.normalize(torch.randn(4, 25, 32, generator=gen), dim=-1)
    ref = nn_distances(q, r)
    got = nn_distances(q, r, compute_dtype=dtype)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max() < 5e-3
    # the same image as reference: distance ~0 (no NaN from 2 - 2 * dot < 0)
    self_d = nn_distances(q, q, compute_dtype=dtype)
    assert torch.isfinite(self_d).all() and self_d[0, :, 0].max() < 0.05


def test_half_precision_msm_close_and_needs_unit_vectors() -> None:
    gen = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(7, 30, 16, generator=gen), dim=-1)
    ref = mutual_scores(z)
    got = mutual_scores(z.bfloat16(), query_chunk=3, ref_chunk=2, compute_dtype=torch.bfloat16)
    assert (got - ref).abs().max() < 5e-3
    with pytest.raises(ValueError, match="unit-norm"):
        mutual_scores(z * 1.5, compute_dtype=torch.bfloat16)
    mutual_scores(z * 1.5)  # float32 cdist takes any features


def test_msm_reports_progress_per_query_block() -> None:
    z = F.normalize(torch.randn(7, 5, 4, generator=torch.Generator().manual_seed(2)), dim=-1)
    seen: list[int] = []
    mutual_scores(z, query_chunk=3, ref_chunk=2, on_block=seen.append)
    assert seen == [3, 3, 1]
