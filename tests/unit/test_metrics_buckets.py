"""Exact pixel metrics by two-level histogram (bucket engine, torch engine) vs the sort path.

The bucket engine has two stores: the compiled paged store (numba; the default) and the numpy
bucket store (the fallback without numba). Both are checked against the sort path, the paged
one also with tiny pages and pending buffers (every path: sparse keys, promotion, folds) and
with one and two threads.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from anomalens.metrics import PixelMetricAccumulator, UndefinedMetricWarning, _buckets, pixel
from anomalens.metrics._buckets import BucketStore, group_by_bucket, keys_to_float32, order_keys
from anomalens.metrics._curves import (
    ap_from_summary,
    aupro_from_summary,
    auroc_from_summary,
    f1max_from_summary,
)
from anomalens.metrics._kernels import PagedStore, available

needs_numba = pytest.mark.skipif(not available(), reason="numba is not installed")
STORES = ["paged", "paged_tiny", "paged_1thread", "numpy"]


@pytest.fixture
def use_store(monkeypatch: pytest.MonkeyPatch) -> object:
    """Make new accumulators use the named store."""

    def use(name: str) -> None:
        if name == "numpy":
            monkeypatch.setattr(pixel, "_new_store", BucketStore)
            return
        if not available():
            pytest.skip("numba is not installed")
        if name == "paged_tiny":
            monkeypatch.setattr(pixel, "_new_store", lambda: PagedStore(page_min=300, pending=5))
        elif name == "paged_1thread":
            monkeypatch.setenv("ANOMALENS_METRIC_THREADS", "1")
            monkeypatch.setattr(pixel, "_new_store", PagedStore)
        else:
            monkeypatch.setattr(pixel, "_new_store", PagedStore)

    return use


KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
Batches = list[tuple[np.ndarray, np.ndarray]]


def _maps(rng: np.random.Generator, n: int, size: int, levels: int | None = None) -> Batches:
    """Seeded maps with blob defects (some images normal), split into uneven batches."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):
        if rng.random() < 0.3:
            continue
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(1.0, size / 4, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    maps = (rng.normal(size=masks.shape) + 1.5 * masks).astype(np.float32)
    if levels is not None:  # heavy ties: `levels` distinct values
        lo, hi = maps.min(), maps.max()
        maps = (np.round((maps - lo) / (hi - lo) * (levels - 1)) / (levels - 1)).astype(np.float32)
    cuts = [0, 1, n // 2, n]
    return [(maps[a:b], masks[a:b]) for a, b in itertools.pairwise(cuts) if b > a]


def _run(batches: Batches, **kwargs: object) -> tuple[PixelMetricAccumulator, dict[str, float]]:
    acc = PixelMetricAccumulator("exact", **kwargs)  # type: ignore[arg-type]
    for maps, masks in batches:
        acc.update(maps, masks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return acc, acc.compute()


def _assert_equal(got: PixelMetricAccumulator, ref: PixelMetricAccumulator) -> None:
    """Identical integer counts; metrics to 1e-12 (AUROC, AP, F1) and 1e-9 (AUPRO)."""
    a, b = got.summary(), ref.summary()
    for field in ("pos", "neg_ge", "neg_gt"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert (a.n_pos, a.n_neg, a.n_regions) == (b.n_pos, b.n_neg, b.n_regions)
    np.testing.assert_allclose(a.region_weight, b.region_weight, rtol=1e-12, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        x, y = got.compute(), ref.compute()
    for key in KEYS:
        tol = 1e-9 if key == "pixel_aupro" else 1e-12
        if np.isnan(y[key]):
            assert np.isnan(x[key]), key
        else:
            assert abs(x[key] - y[key]) <= tol, (key, x[key], y[key])


def _cases() -> dict[str, Batches]:
    rng = np.random.default_rng(16)
    cases = {
        "seeded": _maps(rng, 6, 24),
        "ties_256": _maps(rng, 6, 24, levels=256),
        "ties_3": _maps(rng, 5, 16, levels=3),
    }
    base = _maps(rng, 5, 20)
    cases["constant"] = [(np.full_like(m, 0.25), k) for m, k in base]
    normal = [(m, np.zeros_like(k)) for m, k in base]
    cases["all_normal"] = normal
    cases["all_anomalous_batch"] = [*normal[:1], (base[1][0], np.ones_like(base[1][1])), *base[2:]]
    cases["all_anomalous"] = [(m, np.ones_like(k)) for m, k in base]
    signed = [(m.copy(), k) for m, k in _maps(rng, 5, 16, levels=9)]
    signed[0][0][0, :3] = -0.0  # both zeros, negatives, infinities and a subnormal
    signed[1][0][:, 0, :4] = np.array([0.0, -np.inf, np.inf, 1e-45], np.float32)
    signed[-1][0][-1, -1, -1] = -np.float32(3.5)
    cases["signed_inf"] = [(m - np.float32(0.5), k) for m, k in signed]
    wide = _maps(rng, 4, 20)  # scores over many orders of magnitude: many buckets
    cases["wide_range"] = [(np.exp(8 * m).astype(np.float32), k) for m, k in wide]
    return cases


CASES = _cases()


# ------------------------------------------------------------------------------- keys
def test_order_keys_keep_order_and_equality() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.normal(scale=3.0, size=5000).astype(np.float32),
            np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38], np.float32),
            np.round(rng.normal(size=500), 1).astype(np.float32),
        ]
    )
    keys = order_keys(x)
    assert keys.dtype == np.int32
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(keys[order].astype(np.int64)) >= 0)
    xs, ks = x[order], keys[order]
    np.testing.assert_array_equal(xs[1:] == xs[:-1], ks[1:] == ks[:-1])
    assert order_keys(np.array([-0.0, 0.0], np.float32)).tolist() == [0, 0]
    back = keys_to_float32(keys)
    np.testing.assert_array_equal(back, x)  # -0.0 == 0.0 for numpy's comparison
    assert not np.signbit(keys_to_float32(order_keys(np.array([-0.0], np.float32)))).any()


def test_group_by_bucket_is_a_stable_counting_sort() -> None:
    rng = np.random.default_rng(1)
    buckets = rng.integers(0, 50, size=10_000).astype(np.int32)
    payload = rng.integers(0, 3, size=10_000).astype(np.uint16)  # zeros must survive
    grouped, starts = group_by_bucket(buckets, payload, 50)
    order = np.argsort(buckets, kind="stable")
    np.testing.assert_array_equal(grouped, payload[order])
    np.testing.assert_array_equal(starts, np.concatenate(([0], np.cumsum(np.bincount(buckets)))))
    empty, starts = group_by_bucket(buckets[:0], payload[:0], 50)
    assert empty.size == 0 and starts.shape == (51,) and not starts.any()


# ----------------------------------------------------------------------- bucket engine
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("store", STORES)
def test_bucket_engine_equals_sort_path(name: str, store: str, use_store: Any) -> None:
    """Every store gives the reference counts (ties, signs, infinities, empty classes)."""
    use_store(store)
    got, _ = _run(CASES[name])
    ref, _ = _run(CASES[name], exact_method="sort")
    assert got._engine == "bucket" and ref._engine == "sort"
    assert isinstance(got._buckets, BucketStore if store == "numpy" else PagedStore)
    _assert_equal(got, ref)


@pytest.mark.parametrize("small_bucket", [0, 1 << 30])
def test_numpy_store_per_bucket_strategies(
    small_bucket: int, use_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both per-bucket strategies of the numpy store (65536-bin histogram, radix sort)."""
    use_store("numpy")
    monkeypatch.setattr(_buckets, "_SMALL_BUCKET", small_bucket)
    for name in ("seeded", "ties_256", "signed_inf"):
        _assert_equal(_run(CASES[name])[0], _run(CASES[name], exact_method="sort")[0])


def _large_batches() -> Batches:
    rng = np.random.default_rng(3)
    return [((0.5 + 0.01 * m / 8).astype(np.float32), k) for m, k in _maps(rng, 6, 96, levels=4000)]


def test_numpy_store_large_maps_and_chunked_grouping(
    use_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Buckets with tens of thousands of pixels, grouped over several counting-sort chunks."""
    use_store("numpy")
    monkeypatch.setattr(_buckets, "_GROUP_CHUNK", 10_000)
    batches = _large_batches()
    got, _ = _run(batches)
    ref, _ = _run(batches, exact_method="sort")
    assert got._buckets.counts.max() > 30_000
    _assert_equal(got, ref)
    assert got._buckets.data.view().nbytes == 2 * got._buckets.size == 2 * got.num_pixels


@needs_numba
@pytest.mark.parametrize("threads", ["1", "2"])
def test_paged_store_pages_folds_and_sparse_keys(
    threads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promotion mid-stream, full pending buffers folded, sparse keys of paged buckets."""
    monkeypatch.setenv("ANOMALENS_METRIC_THREADS", threads)
    monkeypatch.setattr(pixel, "_new_store", lambda: PagedStore(page_min=12_000, pending=64))
    batches = [*_large_batches(), *CASES["wide_range"]]  # the first batch (9216 px) is sparse
    got, _ = _run(batches)
    ref, _ = _run(batches, exact_method="sort")
    store = got._buckets
    assert isinstance(store, PagedStore) and store.threads == int(threads)
    assert store.n_pages > 0 and store.size == got.num_pixels
    assert (store.counts[store.page_of < 0] > 0).any()  # some buckets never got a page
    _assert_equal(got, ref)
    # the keys handed to the sort path on widening are every key, in order
    all_keys = np.concatenate([order_keys(m.reshape(-1)) for m, _ in batches])
    np.testing.assert_array_equal(store.keys(), np.sort(all_keys))
    probe = np.sort(np.random.default_rng(0).choice(all_keys, 40))
    np.testing.assert_array_equal(
        store.count_le(probe), np.searchsorted(np.sort(all_keys), probe, side="right")
    )


@pytest.mark.parametrize("threads", ["1", "3", "7"])
@pytest.mark.parametrize("fpr_limit", [0.02, 0.3, 1.0])
def test_fused_metrics_equal_the_reference_curves(
    fpr_limit: float, threads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled one-pass metrics (default) against ``_curves`` on ~50k distinct rows.

    With several threads the buckets are walked in ranges that start from the state above
    them (anomalous pixels, weights and normal share above); the FPR limit then falls inside
    some range, and every range's sums are added up.
    """
    monkeypatch.setenv("ANOMALENS_METRIC_THREADS", threads)
    rng = np.random.default_rng(7)
    masks = rng.random((4, 200, 200)) < 0.3
    maps = (rng.normal(size=masks.shape) + masks).astype(np.float32)
    got = PixelMetricAccumulator("exact", fpr_limit=fpr_limit)
    got.update(maps, masks)
    ref = PixelMetricAccumulator("exact", fpr_limit=fpr_limit, exact_method="sort")
    ref.update(maps, masks)
    assert got.summary().pos.size > 40_000
    _assert_equal(got, ref)
    s = got.summary()  # the reference formulas on the very same rows
    x = got.compute()
    assert abs(x["pixel_aupro"] - aupro_from_summary(s, fpr_limit)) <= 1e-12
    assert abs(x["pixel_ap"] - ap_from_summary(s)) <= 1e-12
    assert x["pixel_auroc"] == auroc_from_summary(s)
    assert x["pixel_f1max"] == f1max_from_summary(s)
    store = got._buckets
    if isinstance(store, PagedStore):  # the ranges' walk against one walk over the rows
        keys, weight = got._anomalous()
        assert len(store._mixed(keys, weight).ranges) == min(int(threads), 7)
        r = got._exact_rows()
        one = store._k.metrics(
            r.pos, r.neg_lt, r.neg_eq, r.weight, r.n_neg, got.num_regions, fpr_limit
        )
        ranged = store.metrics(keys, weight, got.num_regions, fpr_limit)
        assert ranged[:2] == tuple(int(v) for v in one[:2]) and ranged[3] == one[3]
        # float sums in another order (the weight above a range is summed per bucket)
        assert abs(ranged[2] - one[2]) <= 1e-13 and abs(ranged[4] - one[4]) <= 1e-12


@needs_numba
@pytest.mark.parametrize("threads", ["1", "2"])
def test_paged_store_counts_past_uint16(threads: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """uint16 page bins that wrap carry into ``wraps``: every read path sees exact counts."""
    monkeypatch.setenv("ANOMALENS_METRIC_THREADS", threads)
    store = PagedStore(page_min=1, pending=1000)
    half = order_keys(np.full(70_000, 0.5, np.float32))
    other = order_keys(np.float32(0.5) + np.arange(1, 3001, dtype=np.float32) * 1e-7)
    store.add(half)  # counted first: paged at once, folded in full pending buffers
    store.add(np.concatenate([other, half, half]))  # 210,000 of one value in all
    keys = np.concatenate([half, half, half, other])
    rows = store.rows(half[:1], np.ones(1))
    assert rows.neg_eq.tolist() == [209_999] and rows.n_neg == keys.size - 1
    assert store.wrapped.any() and store.n_pages >= 1
    assert store.nbytes >= int(store.wrapped.sum()) * 65536 * 4
    np.testing.assert_array_equal(store.keys(), np.sort(keys))
    probe = np.unique(np.concatenate([half[:1], other[::500]]))
    np.testing.assert_array_equal(
        store.count_le(probe), np.searchsorted(np.sort(keys), probe, side="right")
    )
    assert store.counts.sum() == keys.size
    # pages grown after a wrap keep the carried counts
    store._grow(store.hist.shape[1] + 1)
    assert store.rows(half[:1], np.ones(1)).neg_eq.tolist() == [209_999]


def test_nan_maps_are_refused_before_anything_is_stored() -> None:
    acc = PixelMetricAccumulator("exact")
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.array([[np.nan, 1.0]], np.float32), np.array([[0, 1]], bool))
    assert acc.num_pixels == 0 and acc._buckets.size == 0


@needs_numba
def test_paged_store_page_budget_keeps_buckets_sparse() -> None:
    """Past the page budget further buckets stay sparse; the counts stay exact."""
    store = PagedStore(page_min=10, pending=16, page_budget=0)
    ref = BucketStore()
    rng = np.random.default_rng(5)
    keys = order_keys(rng.normal(size=20_000).astype(np.float32))
    store.add(keys)
    store.add(keys[::3])
    ref.add(keys)
    ref.add(keys[::3])
    assert (store.counts >= 10).any()
    assert store.n_pages == 0 and store.sparse.size == keys.size + keys[::3].size
    pos = keys[:500]
    a, b = store.rows(pos, np.ones(pos.size)), ref.rows(pos, np.ones(pos.size))
    for field in ("keys", "pos", "neg_lt", "neg_eq"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    probe = PagedStore(page_min=100, pending=16)
    one = PagedStore(page_min=100, pending=16, page_budget=probe.page_bytes)
    dense = np.float32(1.0) + rng.random(5000).astype(np.float32) * 1e-3  # one bucket
    less = np.float32(2.0) + rng.random(500).astype(np.float32) * 1e-3  # another
    one.add(np.concatenate([keys, order_keys(dense), order_keys(less)]))
    assert (one.counts >= 100).sum() > 1 and one.n_pages == 1  # the densest bucket only
    assert one.page_of[np.argmax(one.counts)] == 0


def test_without_numba_the_numpy_store_is_used() -> None:
    """``ANOMALENS_NO_NUMBA=1`` (or numba missing): same metrics from the numpy store."""
    code = (
        "import numpy as np, sys\n"
        "from anomalens.metrics import PixelMetricAccumulator, _kernels\n"
        "assert not _kernels.available() and 'numba' not in sys.modules\n"
        "rng = np.random.default_rng(0)\n"
        "maps = rng.normal(size=(3, 32, 32)).astype(np.float32)\n"
        "masks = maps > 1.0\n"
        "a = PixelMetricAccumulator('exact'); a.update(maps, masks)\n"
        "b = PixelMetricAccumulator('exact', exact_method='sort'); b.update(maps, masks)\n"
        "assert type(a._buckets).__name__ == 'BucketStore'\n"
        "x, y = a.compute(), b.compute()\n"
        "assert all(abs(x[k] - y[k]) < 1e-12 for k in x), (x, y)\n"
    )
    env = {**os.environ, "ANOMALENS_NO_NUMBA": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_compute_is_repeatable_and_streams_on() -> None:
    batches = CASES["ties_256"]
    acc, first = _run(batches[:2])
    again, _ = _run(batches[:2])
    assert acc.compute() == first == again.compute()
    acc.update(*batches[2])
    ref, _ = _run(batches, exact_method="sort")
    _assert_equal(acc, ref)


def test_float64_batch_widens_bucket_store_to_sort() -> None:
    batches = CASES["seeded"]
    mixed = [batches[0], (batches[1][0].astype(np.float64) + 1e-9, batches[1][1]), batches[2]]
    acc, _ = _run(mixed)
    ref, _ = _run(mixed, exact_method="sort")
    assert acc._engine == "sort"
    _assert_equal(acc, ref)


@pytest.mark.parametrize("name", ["seeded", "ties_256", "wide_range"])
def test_cflow200_bucket_equals_sort(name: str) -> None:
    _, got = _run(CASES[name], aupro_variant="cflow200")
    _, ref = _run(CASES[name], aupro_variant="cflow200", exact_method="sort")
    assert got["pixel_aupro"] == pytest.approx(ref["pixel_aupro"], abs=1e-12)


def test_exact_method_is_validated() -> None:
    with pytest.raises(ValueError, match="exact_method"):
        PixelMetricAccumulator("exact", exact_method="radix")  # type: ignore[arg-type]


# ------------------------------------------------------------------------ torch engine
@pytest.mark.parametrize("name", ["seeded", "ties_256", "constant", "all_anomalous_batch"])
def test_torch_engine_on_cpu_tensors_equals_numpy(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch path (run on CPU tensors here) gives the numpy path's counts and metrics."""
    monkeypatch.setattr(pixel, "_TORCH_ON_CPU", True)
    monkeypatch.setattr(_buckets, "_TORCH_BINS_CPU", 2 * _buckets.NUM_BUCKETS)  # several passes
    batches = CASES[name]
    tensors = [(torch.from_numpy(m), torch.from_numpy(k)) for m, k in batches]
    got, _ = _run(tensors)
    ref, _ = _run(batches)
    assert got._engine == "torch"
    _assert_equal(got, ref)
    _, got_cflow = _run(tensors, aupro_variant="cflow200")
    _, ref_cflow = _run(batches, aupro_variant="cflow200")
    assert got_cflow["pixel_aupro"] == pytest.approx(
        ref_cflow["pixel_aupro"], abs=1e-12, nan_ok=True
    )


def test_torch_engine_accepts_numpy_batches_and_rejects_float64(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pixel, "_TORCH_ON_CPU", True)
    (m0, k0), (m1, k1), *_ = CASES["signed_inf"]
    acc = PixelMetricAccumulator("exact")
    acc.update(torch.from_numpy(m0).half().float(), k0)
    acc.update(m1, k1)  # numpy float32 joins the tensors on their device
    ref = PixelMetricAccumulator("exact")
    ref.update(torch.from_numpy(m0).half().float().numpy(), k0)
    ref.update(m1, k1)
    _assert_equal(acc, ref)
    with pytest.raises(ValueError, match="float32 torch maps"):
        acc.update(m1.astype(np.float64), k1)


def test_cpu_tensors_use_the_numpy_path_by_default() -> None:
    maps, masks = CASES["seeded"][1]
    acc = PixelMetricAccumulator("exact")
    acc.update(torch.from_numpy(maps), masks)
    assert acc._engine == "bucket"
    binned = PixelMetricAccumulator("binned")
    binned.update(torch.from_numpy(maps).bfloat16(), torch.from_numpy(masks))
    assert binned.num_pixels == maps.size


@needs_numba
def test_paged_store_counts_a_batch_first_after_the_scores_moved() -> None:
    """The first batch is counted per bucket before it is stored (its dense buckets are paged
    at once); a batch whose scores land in new buckets goes sparse, its buckets get pages
    after it, and the next batch is counted first again. Counts stay exact throughout."""
    rng = np.random.default_rng(9)
    store = PagedStore(page_min=2000, pending=256)
    low = order_keys((1.0 + rng.random(20_000) * 1e-3).astype(np.float32))  # a few buckets
    store.add(low)
    assert store.n_pages > 0 and store.sparse.size < low.size // 10  # paged from the start
    assert not store._precount
    high = order_keys((8.0 + rng.random(20_000) * 1e-2).astype(np.float32))  # new buckets
    pages = store.n_pages
    store.add(high)
    assert store.n_pages > pages and store.sparse.size >= high.size // 2  # stored sparse
    assert store._precount  # ... so the next batch is counted first
    store.add(high[::2])
    assert not store._precount
    keys = np.concatenate([low, high, high[::2]])
    np.testing.assert_array_equal(store.keys(), np.sort(keys))
    rows = store.rows(high[:50], np.ones(50))
    ref = BucketStore()
    ref.add(keys)
    want = ref.rows(high[:50], np.ones(50))
    for field in ("keys", "pos", "neg_lt", "neg_eq"):
        np.testing.assert_array_equal(getattr(rows, field), getattr(want, field))


def test_no_hugepages_restores_numpy_advice_across_threads() -> None:
    """The process-wide numpy switch is off while any thread is inside, then restored."""
    import threading

    from anomalens.metrics._kernels import no_hugepages

    toggle = getattr(getattr(np, "_core", np).multiarray, "_set_madvise_hugepage", None)
    if toggle is None:
        pytest.skip("this numpy has no huge-page switch")
    before = toggle(True)
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with no_hugepages():
            inside.set()
            leave.wait(10)

    worker = threading.Thread(target=other)
    worker.start()
    try:
        assert inside.wait(10)
        with no_hugepages():
            assert toggle(False) is False  # off while both are inside
        assert toggle(False) is False  # still off: the other thread is inside
    finally:
        leave.set()
        worker.join(10)
    assert toggle(before) is True  # restored when the last one left
