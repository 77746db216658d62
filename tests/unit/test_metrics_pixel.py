"""Pixel metrics: exact vs sklearn and slow brute-force AUPRO references; binned vs exact."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from anomalens.metrics import (
    PixelMetricAccumulator,
    UndefinedMetricWarning,
    aupro,
    label_regions,
    pixel_metrics,
)

KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


# --------------------------------------------------------------------------- references
def _regions(masks: np.ndarray) -> list[np.ndarray]:
    """Every 8-connected component of every image, as a full-size bool array."""
    out = []
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            region = np.zeros(masks.shape, dtype=bool)
            region[i] = lab == k
            out.append(region)
    return out


def ref_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Obviously-correct AUPRO: loop over every distinct threshold (score >= t)."""
    regions = _regions(masks)
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(float(np.mean([pred[r].mean() for r in regions])))
    fpr, pro = np.array(fprs), np.array(pros)
    i = int(np.flatnonzero(fpr <= limit)[-1])
    area = float(np.sum(np.diff(fpr[: i + 1]) * (pro[1 : i + 1] + pro[:i])) / 2)
    if fpr[i] < limit:
        y = pro[i] + (pro[i + 1] - pro[i]) * (limit - fpr[i]) / (fpr[i + 1] - fpr[i])
        area += (limit - fpr[i]) * (pro[i] + y) / 2
    return area / limit


def ref_aupro_cflow200(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Legacy variant as described in evaluation.md §3.2, written as a plain loop."""
    regions = _regions(masks)
    normal = ~masks
    lo, hi = maps.min(), maps.max()
    fprs, pros = [], []
    for t in np.arange(lo, hi, (hi - lo) / 200):
        pred = maps > t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(float(np.mean([pred[r].sum() / r.sum() for r in regions])))
    fpr, pro = np.array(fprs), np.array(pros)
    keep = fpr < limit
    fpr, pro = fpr[keep], pro[keep]
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    return float(skm.auc(fpr, pro))


def make_case(
    rng: np.random.Generator, n: int = 4, size: int = 12, levels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Random maps with blob-like masks (some images normal); ``levels`` quantises for ties."""
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        if i == 0 or rng.random() < 0.25:
            continue  # normal image
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(0.8, size / 4, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if not masks[i].any():
            masks[i, size // 2, size // 2] = True
    if not masks.any():
        masks[-1, 0, 0] = True
    maps = rng.normal(size=masks.shape) + masks * rng.uniform(0.5, 2.5)
    if levels is not None:
        maps = np.round(maps * levels / 4) / levels
    return maps.astype(np.float32), masks


def sklearn_pixel(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    s, y = maps.ravel(), masks.ravel()
    p, r, _ = skm.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return {
        "pixel_auroc": skm.roc_auc_score(y, s),
        "pixel_ap": skm.average_precision_score(y, s),
        "pixel_f1max": float(np.max(f1[np.isfinite(f1)])),
    }


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("levels", [None, 3, 12])
def test_exact_matches_references(levels: int | None) -> None:
    rng = np.random.default_rng(0 if levels is None else levels)
    for _ in range(12):
        maps, masks = make_case(rng, n=int(rng.integers(2, 6)), levels=levels)
        ours = pixel_metrics(maps, masks, mode="exact")
        for key, value in sklearn_pixel(maps, masks).items():
            assert ours[key] == pytest.approx(value, abs=1e-6), key
        assert ours["pixel_aupro"] == pytest.approx(ref_aupro(maps, masks), abs=1e-4)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_fpr_limits(limit: float) -> None:
    rng = np.random.default_rng(11)
    for _ in range(4):
        maps, masks = make_case(rng, levels=6)
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(
            ref_aupro(maps, masks, limit), abs=1e-4
        )


def test_aupro_cflow200_matches_loop() -> None:
    rng = np.random.default_rng(5)
    for _ in range(4):
        maps, masks = make_case(rng, n=3, size=10)
        ours = aupro(maps, masks, variant="cflow200")
        assert ours == pytest.approx(ref_aupro_cflow200(maps, masks), abs=1e-6)
        acc = PixelMetricAccumulator("exact", aupro_variant="cflow200")
        acc.update(maps[:1], masks[:1])
        acc.update(maps[1:], masks[1:])
        assert acc.compute()["pixel_aupro"] == pytest.approx(ours, abs=1e-12)


def test_aupro_perfect_and_region_weighting() -> None:
    masks = np.zeros((2, 20, 20), dtype=bool)
    masks[0, 2:4, 2:4] = True  # small region: 4 px
    masks[1, 5:15, 5:15] = True  # large region: 100 px
    maps = masks.astype(np.float32)
    assert aupro(maps, masks) == pytest.approx(1.0)
    # Only the small region detected: PRO = 1/2 although it holds 4 of 104 anomalous pixels.
    maps = np.zeros_like(maps)
    maps[0, 2:4, 2:4] = 1.0
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(ref_aupro(maps, masks))
    # Curve: (0,0) -> (0,0.5) -> (1,1): area up to FPR 0.3 = 0.3 * (0.5 + 0.65) / 2.
    expected = 0.3 * (0.5 + 0.65) / 2 / 0.3
    assert aupro(maps, masks) == pytest.approx(expected)


def test_label_regions_8_connected_per_image() -> None:
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 4, 4] = True
    masks[1, 0, 0] = True  # same place, other image: its own region
    labels, n = label_regions(masks)
    assert n == 3
    assert labels[0, 0, 0] == labels[0, 1, 1] != labels[0, 4, 4]
    assert labels[1, 0, 0] not in (labels[0, 0, 0], labels[0, 4, 4])


def _label_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    spiral = np.zeros((1, 9, 9), dtype=bool)  # one region that merges many provisional labels
    spiral[0, ::2, :] = True
    spiral[0, :, 0] = True
    spiral[0, 1::4, -1] = True
    spiral[0, 3::4, 4] = True
    vee = np.zeros((1, 4, 7), dtype=bool)  # two arms met only on the last row
    vee[0, [0, 1, 2, 3, 2, 1, 0], np.arange(7)] = True
    return {
        "noise": rng.random((7, 23, 31)) < 0.45,  # many regions, diagonal joins, borders
        "sparse_dots": rng.random((5, 40, 17)) < 0.05,
        "checker": (np.indices((2, 12, 12)).sum(axis=0) % 2).astype(bool),
        "full_and_empty": np.stack([np.ones((9, 9), bool), np.zeros((9, 9), bool)]),
        "spiral": spiral,
        "vee": vee,
        "one_image": rng.random((1, 30, 30)) < 0.5,
        "one_column": rng.random((3, 25, 1)) < 0.6,
    }


@pytest.mark.parametrize("case", list(_label_cases()))
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_compiled_labelling_equals_scipy(case: str, workers: int) -> None:
    """``_kernels.label_masked`` gives the scipy reference's arrays, numbering included."""
    from anomalens.metrics import _kernels, pixel

    if not _kernels.available():
        pytest.skip("numba is not installed")
    masks = _label_cases()[case]
    maps = np.random.default_rng(3).random(masks.shape).astype(np.float32)
    want = pixel._anomalous_pixels(maps, masks)
    got = _kernels.label_masked(maps, masks, workers=workers)
    for g, w, name in zip(got, want, ("scores", "regions", "sizes"), strict=True):
        assert g is not None and w is not None
        np.testing.assert_array_equal(g, w, err_msg=name)
    if masks.any():  # the numbering is that of scipy.ndimage.label, image by image
        labels, n = label_regions(masks)
        assert got[2].size == n
        np.testing.assert_array_equal(got[1], labels[masks] - 1)


def test_streaming_equals_one_shot_exact() -> None:
    rng = np.random.default_rng(2)
    maps, masks = make_case(rng, n=9, size=16, levels=8)
    one = pixel_metrics(maps, masks)
    acc = PixelMetricAccumulator("exact")
    for i in range(0, 9, 4):
        acc.update(maps[i : i + 4], masks[i : i + 4])
    streamed = acc.compute()
    assert streamed == pytest.approx(one, abs=1e-12)
    assert acc.compute() == pytest.approx(one, abs=1e-12)  # compute is repeatable
    acc.update(maps[0], masks[0])  # a single (H, W) map after compute
    assert acc.num_pixels == maps[0].size * 10


def _smooth_case(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = make_case(rng, n=n, size=size)
    return ndimage.gaussian_filter(maps, (0, 1.5, 1.5)).astype(np.float32), masks


def test_binned_close_to_exact() -> None:
    rng = np.random.default_rng(4)
    maps, masks = _smooth_case(rng, n=8, size=48)
    exact = pixel_metrics(maps, masks, mode="exact")
    binned = pixel_metrics(maps, masks, mode="binned", num_bins=100_000)
    for key in KEYS:
        assert abs(binned[key] - exact[key]) <= 1e-4, key


@pytest.mark.parametrize("num_bins", [20, 300, 100_000])
def test_binned_error_bounds_hold(num_bins: int) -> None:
    rng = np.random.default_rng(num_bins)
    for _ in range(4):
        maps, masks = _smooth_case(rng, n=5, size=24)
        exact = pixel_metrics(maps, masks)
        acc = PixelMetricAccumulator("binned", num_bins=num_bins)
        acc.update(maps, masks)
        got, bounds = acc.compute(), acc.error_bounds()
        for key in KEYS:
            assert abs(got[key] - exact[key]) <= bounds[key] + 1e-12, (key, num_bins)
        if num_bins == 20:
            assert min(bounds.values()) > 0  # coarse bins: bounds are real, not zero


def test_float64_maps_exact_and_binned() -> None:
    rng = np.random.default_rng(9)
    maps, masks = _smooth_case(rng, n=6, size=32)
    maps = maps.astype(np.float64) * 1e-3 + 5.0  # narrow range far from 0
    exact = pixel_metrics(maps, masks)
    assert exact["pixel_aupro"] == pytest.approx(ref_aupro(maps, masks), abs=1e-4)
    assert exact["pixel_auroc"] == pytest.approx(sklearn_pixel(maps, masks)["pixel_auroc"])
    binned = pixel_metrics(maps, masks, mode="binned", num_bins=100_000)
    for key in KEYS:
        assert abs(binned[key] - exact[key]) <= 1e-4, key


def test_negative_and_signed_zero_scores() -> None:
    rng = np.random.default_rng(10)
    maps, masks = make_case(rng, n=4, levels=2)
    maps = (maps - 0.5).astype(np.float32)
    maps[0, :2] = -0.0
    maps[1, :2] = 0.0
    ours = pixel_metrics(maps, masks)
    for key, value in sklearn_pixel(maps, masks).items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert ours["pixel_aupro"] == pytest.approx(ref_aupro(maps, masks), abs=1e-9)


def test_binned_grid_growth_and_constant_first_batch() -> None:
    rng = np.random.default_rng(6)
    maps, masks = _smooth_case(rng, n=10, size=40)
    maps[3:6] *= 8.0  # later batches far outside the first batch's range
    maps[6:] -= 5.0
    exact = pixel_metrics(maps, masks, mode="exact")
    acc = PixelMetricAccumulator("binned", num_bins=200_000)
    acc.update(np.full((1, 40, 40), 0.25, np.float32), np.zeros((1, 40, 40), bool))
    exact_acc = PixelMetricAccumulator("exact")
    exact_acc.update(np.full((1, 40, 40), 0.25, np.float32), np.zeros((1, 40, 40), bool))
    for i in range(0, 10, 3):
        acc.update(maps[i : i + 3], masks[i : i + 3])
        exact_acc.update(maps[i : i + 3], masks[i : i + 3])
    assert acc._shift > 0  # the grid really grew
    assert int(acc._all_hist.sum()) == acc.num_pixels == maps.size + 1600
    ref, got = exact_acc.compute(), acc.compute()
    for key in KEYS:
        assert abs(got[key] - ref[key]) <= 1e-4, key
    assert exact["pixel_auroc"] != ref["pixel_auroc"]  # the extra constant image counted


def test_binned_is_exact_when_bins_separate_values() -> None:
    rng = np.random.default_rng(8)
    maps, masks = make_case(rng, n=5, size=14)
    maps = np.clip(np.round(maps * 10) + 30, 0, 63).astype(np.float32)  # integers 0..63
    exact = pixel_metrics(maps, masks)
    binned = pixel_metrics(maps, masks, mode="binned", num_bins=64, score_range=(0.0, 63.0))
    assert binned == pytest.approx(exact, abs=1e-12)


def test_binned_all_constant_maps() -> None:
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[1, 1:3, 1:3] = True
    maps = np.full(masks.shape, 0.7, dtype=np.float32)
    binned = pixel_metrics(maps, masks, mode="binned")
    exact = pixel_metrics(maps, masks)
    assert binned == pytest.approx(exact)
    assert binned["pixel_auroc"] == 0.5


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_no_anomalous_pixel_is_nan(mode: str) -> None:
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    with pytest.warns(UndefinedMetricWarning):
        out = pixel_metrics(maps, masks, mode=mode)
    assert all(np.isnan(out[k]) for k in KEYS)


def test_empty_accumulator_is_nan() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = PixelMetricAccumulator("binned").compute()
    assert all(np.isnan(v) for v in out.values())
    assert any(issubclass(w.category, UndefinedMetricWarning) for w in caught)


def test_validation_errors() -> None:
    maps = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="same shape"):
        pixel_metrics(maps, np.zeros((1, 4, 5), bool))
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(np.full((1, 4, 4), np.nan), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="cflow200"):
        PixelMetricAccumulator("binned", aupro_variant="cflow200")
    with pytest.raises(ValueError, match="mode"):
        PixelMetricAccumulator("approx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="score_range"):
        PixelMetricAccumulator("binned", score_range=(1.0, 1.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_binning_puts_every_pixel_in_the_numpy_bin(
    dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled bin counts equal ``bincount(_fine(...))`` exactly, at bin edges too and
    after the grid has grown (offset and shift), on one thread and on two."""
    from anomalens.metrics import _kernels

    if not _kernels.available():
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(4)
    nb = 1000
    first = rng.random((4, 40, 40)).astype(dtype)
    width = (first.max() - first.min()) / (nb - 1)
    edges = first.min() + width * rng.integers(0, nb, 20_000)  # scores on and next to edges
    near = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)])
    wide = np.concatenate([near, rng.normal(0.5, 2.0, 10_000)])  # grows the grid
    later = wide[: wide.size // 800 * 800].reshape(-1, 20, 40).astype(dtype)
    batches = [(first, first > 0.9), (later, later > 1.5)]
    hists = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(PixelMetricAccumulator, "_bin_compiled", lambda self, flat: False)
        for workers in ("1", "2"):
            monkeypatch.setenv("ANOMALENS_METRIC_THREADS", workers)
            acc = PixelMetricAccumulator("binned", num_bins=nb)
            for maps, masks in batches:
                acc.update(maps, masks)
            assert acc._shift > 0  # the grid grew
            hists.append(acc._all_hist.copy())
    for h in hists[1:]:
        np.testing.assert_array_equal(h, hists[0])
    assert hists[0].sum() == sum(m.size for m, _ in batches)
