"""Private: the compiled exact store of the pixel metrics (numba kernels on a thread pool).

The exact metrics need, at every distinct anomalous score ``v``, the number of normal pixels
below ``v`` and equal to ``v``. :class:`PagedStore` keeps the exact count of every float32
value seen, at O(1) work per pixel and with no comparison sort:

* A pixel's int32 *order key* (``_buckets.order_keys``: same order and equality as the
  floats) splits into a *bucket* (high 16 bits) and a *low part* (low 16 bits).
* A bucket that has received at least ``page_min`` pixels (default ``PAGE_MIN_PER_THREAD``
  x T) owns a *page* per thread: a 65536-bin histogram of its low parts. Counts are uint16;
  a bin that wraps to 0 adds one to the same bin of a uint32 *wraps* page (units of 65536),
  which is allocated lazily zeroed and read only for the pages flagged as wrapped, so it
  costs nothing until a single value is seen 65536 times by one thread. A paged pixel's low
  part is first appended to its page's *pending* buffer, and a full buffer (``PENDING`` low
  parts) is folded into the histogram at once: 65536 increments into one 128 KiB page stay
  in the CPU cache, whereas incrementing the histogram once per pixel misses the cache
  nearly every time (~11-15 ns per pixel here, against ~1 ns this way).
* Pixels of a bucket with fewer pixels are kept as raw int32 keys (*sparse*, 4 bytes per
  pixel), so scores spread thinly over many exponents never allocate pages. At ``compute``
  the sparse keys of buckets paged meanwhile go through the pages like new pixels, and the
  rest are grouped by bucket (counting sort). So that the dense buckets do not start sparse,
  the first batch (and a batch after one whose scores moved to new buckets) is counted per
  bucket first (~0.5 ns per pixel), and the buckets it brings to ``page_min`` get pages
  before it is stored.

Each batch is split into T contiguous shares, one per thread (``ANOMALENS_METRIC_THREADS``,
default: the CPU count); thread t only writes its own pages and pending buffers (its slices
``hist[t]`` etc. are contiguous), so no locks are needed, and ``compute`` adds the T pages of
a bucket up. The kernels are serial numba functions that release the GIL, run on a small
thread pool.

``compute`` walks the buckets that hold anomalous pixels in T ranges on the threads: for each
bucket, its all-pixel counts (pages or sparse keys) and its anomalous pixels (grouped by a
counting sort) give one row per distinct anomalous key with the exact normal counts below and
equal, and the rows go straight into the metric sums (descending, each range starting from
the state above it), so they are never stored; ``rows`` stores them for the other uses. The
counts are identical to the numpy ``BucketStore`` and to the sort path.

Memory: T x (128 KiB histogram + 128 KiB pending) per paged bucket, at most ``PAGE_BUDGET``
(2 GiB; further buckets stay sparse), plus 4 bytes per sparse pixel (and 256 KiB per page
and thread that wrapped). Page capacity is reserved as address space ahead of use (the OS
zeroes memory on first touch). Large arrays are allocated without numpy's huge-page advice
(see :func:`no_hugepages`). Without numba (or with ``ANOMALENS_NO_NUMBA=1``) the numpy
``BucketStore`` is used: same results, 2 bytes per pixel, several times slower.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from anomalens.metrics._buckets import NUM_BUCKETS, ExactRows, GrowingArray

__all__ = [
    "PAGE_BUDGET",
    "PAGE_MIN_PER_THREAD",
    "PENDING",
    "PagedStore",
    "available",
    "compiled",
    "label_masked",
    "no_hugepages",
    "parallel",
    "shares",
    "threads",
]

log = logging.getLogger(__name__)

_OFFSET = 1 << 15
# pixels a bucket needs before it gets its pages, per thread (T pages cost T x 256 KiB, as
# much as 65536 T sparse keys); 8192 per thread was the fastest of 2**13..2**16 on the
# 1725-map benchmark, and used less memory than 2**16 (fewer keys waiting sparse)
PAGE_MIN_PER_THREAD = 1 << 13
PENDING = 1 << 16  # low parts buffered per page and thread before they are folded
PAGE_BUDGET = 2 << 30  # bytes of pages at most (then further buckets stay sparse)
# page capacity of the first allocation: address space only until a page is used (the OS
# zeroes memory on first touch), and it spares copying the pages when more buckets fill up
_FIRST_PAGES = 1024
_PRECOUNT_AFTER = 1 / 16  # count the next batch first if a batch left this share sparse in
# buckets that got pages right after it (the scores moved to new buckets)


_ADVICE_LOCK = threading.Lock()
_advice_off = 0  # callers inside no_hugepages(), all threads
_advice_before = True  # numpy's setting before the first of them


@contextlib.contextmanager
def no_hugepages() -> Iterator[None]:
    """Allocate without numpy's transparent-huge-page advice.

    numpy advises huge pages for arrays of 4 MiB and more; where the kernel then compacts
    memory on the page fault (``defrag=madvise``) first touches of the pages cost far more
    than the work itself (measured here: storing a pixel went from 3.8 to 4.8 ns, filling
    10 M rows from 0.2 to 0.8 s). numpy's switch is process-wide: it is turned off while any
    thread is inside this context and restored when the last one leaves.
    """
    global _advice_off, _advice_before
    toggle = getattr(getattr(np, "_core", np).multiarray, "_set_madvise_hugepage", None)
    if toggle is None:  # pragma: no cover - private numpy switch gone: keep the default
        yield
        return
    with _ADVICE_LOCK:
        if _advice_off == 0:
            _advice_before = bool(toggle(False))
        _advice_off += 1
    try:
        yield
    finally:
        with _ADVICE_LOCK:
            _advice_off -= 1
            if _advice_off == 0:
                toggle(_advice_before)


def _disabled() -> bool:
    return os.environ.get("ANOMALENS_NO_NUMBA", "").strip() not in ("", "0")


@functools.cache
def compiled() -> ModuleType | None:
    """The numba kernels (``_numba_kernels``), imported on first use.

    ``import numba`` alone takes about 0.5 s, so ``import anomalens.metrics`` does not do it.
    Returns None when numba cannot be imported or ``ANOMALENS_NO_NUMBA=1``; the callers then
    use the numpy ``BucketStore``. Compiled code is cached on disk (numba ``cache=True``):
    only the first run on a machine pays the compilation (~5-10 s).
    """
    if _disabled():
        return None
    try:
        from anomalens.metrics import _numba_kernels
    except ImportError as err:  # pragma: no cover - numba is a dependency
        log.warning("numba is not available (%s): exact pixel metrics use the numpy path", err)
        return None
    return _numba_kernels


def available() -> bool:
    """Whether the compiled kernels can be used (numba importable, not switched off)."""
    return compiled() is not None


def threads() -> int:
    """Threads of a new store: ``ANOMALENS_METRIC_THREADS``, else the usable CPU count."""
    raw = os.environ.get("ANOMALENS_METRIC_THREADS", "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError as err:
            raise ValueError(f"ANOMALENS_METRIC_THREADS must be an integer, got {raw!r}") from err
        return max(1, min(value, 64))
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 64))


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="anomalens-metrics")


def parallel(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run the calls (GIL-free kernels) on the pool; the first one on this thread."""
    if len(calls) == 1:
        return [calls[0]()]
    futures = [_pool(len(calls) - 1).submit(c) for c in calls[1:]]
    first = calls[0]()
    return [first, *(f.result() for f in futures)]


def shares(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) shares of range(n)."""
    step = -(-n // parts)
    return [(min(n, t * step), min(n, (t + 1) * step)) for t in range(parts)]


class _Mixed(NamedTuple):
    """The anomalous pixels grouped by bucket, and the buckets that hold them."""

    sparse: np.ndarray  # sparse keys of unpaged buckets, grouped by bucket
    sparse_starts: np.ndarray  # (65537,)
    keys: np.ndarray  # anomalous keys grouped by bucket
    weight: np.ndarray  # their weights, in the same order
    starts: np.ndarray  # (65537,)
    per_bucket: np.ndarray  # anomalous pixels per bucket (65536,)
    below: np.ndarray  # (65537,) normal pixels in the buckets before each
    mixed: np.ndarray  # the buckets with anomalous pixels, ascending
    ranges: list[tuple[int, int]]  # one range of ``mixed`` per thread


class PagedStore:
    """Exact counts of every int32 order key added (see the module docstring).

    Args:
        page_min: pixels a bucket needs before it gets pages (default
            ``PAGE_MIN_PER_THREAD`` x threads).
        pending: low parts buffered per page and thread before a fold.
        page_budget: bytes the pages may take in all; further buckets stay sparse.
    """

    def __init__(
        self,
        page_min: int | None = None,
        pending: int = PENDING,
        page_budget: int = PAGE_BUDGET,
    ) -> None:
        if page_min is None:
            page_min = PAGE_MIN_PER_THREAD * threads()
        if page_min < 1 or pending < 1 or page_budget < 0:
            raise ValueError(
                f"page_min and pending must be >= 1 and page_budget >= 0, got {page_min}, "
                f"{pending}, {page_budget}"
            )
        self.page_budget = int(page_budget)
        kernels = compiled()
        if kernels is None:
            raise RuntimeError(
                "the paged store needs numba (pip install numba); without it the numpy "
                "BucketStore is used"
            )
        self._k: Any = kernels
        self.page_min = int(page_min)
        self.threads = threads()
        t = self.threads
        self.n_keys = 0
        self.sparse_counts = np.zeros(NUM_BUCKETS, dtype=np.int64)  # keys kept sparse, ever
        self._counts: np.ndarray | None = None  # all keys per bucket (at settle)
        self.page_of = np.full(NUM_BUCKETS, -1, dtype=np.int32)
        self.n_pages = 0
        # (thread, page, ...): each thread's arrays are contiguous (``hist[t]`` etc.)
        self.hist = np.zeros((t, 0, NUM_BUCKETS), dtype=np.uint16)
        self.wraps = np.zeros((t, 0, NUM_BUCKETS), dtype=np.uint32)  # see the module doc
        self.wrapped = np.zeros((t, 0), dtype=np.bool_)
        self.pending = np.zeros((t, 0, int(pending)), dtype=np.uint16)
        self.pending_n = np.zeros((t, 0), dtype=np.int64)
        self.sparse = GrowingArray(np.int32)
        self._grouped: tuple[np.ndarray, np.ndarray] | None = None  # sparse keys by bucket
        self._buffers: list[np.ndarray] = []
        self._precount = True  # count the next batch per bucket before storing it

    @property
    def size(self) -> int:
        """Number of keys added."""
        return self.n_keys

    @property
    def counts(self) -> np.ndarray:
        """Keys per bucket, all of them: (65536,) int64 (folds what is pending)."""
        return self._counts_settled()

    @property
    def nbytes(self) -> int:
        """Bytes in use: the pages given out (histograms, pending buffers, the wraps of
        wrapped ones), sparse keys and tables.

        Page capacity not yet given out is address space only (zeroed by the OS on first
        touch) and is not counted; ``tracemalloc`` counts it, the resident set does not.
        """
        arrays = (self.sparse_counts, self.page_of, self.pending_n, self.sparse.data)
        grouped = self._grouped[1].nbytes if self._grouped else 0
        wrapped = int(self.wrapped.sum()) * NUM_BUCKETS * self.wraps.itemsize
        pages = self.n_pages * self.page_bytes
        return int(sum(a.nbytes for a in arrays) + grouped + wrapped + pages)

    @property
    def page_bytes(self) -> int:
        """Bytes of one bucket's pages and pending buffers (all threads)."""
        return self.threads * (NUM_BUCKETS * self.hist.itemsize + 2 * self.pending.shape[2])

    def _grow(self, n_pages: int) -> None:
        """Room for ``n_pages`` pages: fresh zeroed arrays (the OS zeroes pages lazily, on
        first touch) with the used pages copied in, capacity doubling."""
        t, cap, _ = self.hist.shape
        if n_pages <= cap:
            return
        budget = max(n_pages, self.page_budget // self.page_bytes)  # never reserve past it
        new_cap = min(max(n_pages, 2 * cap, _FIRST_PAGES), budget)
        used = self.n_pages
        with no_hugepages():
            hist = np.zeros((t, new_cap, NUM_BUCKETS), dtype=np.uint16)
            wraps = np.zeros((t, new_cap, NUM_BUCKETS), dtype=np.uint32)
            pending = np.zeros((t, new_cap, self.pending.shape[2]), dtype=np.uint16)
        hist[:, :used] = self.hist[:, :used]
        for th, p in zip(*np.nonzero(self.wrapped[:, :used]), strict=True):
            wraps[th, p] = self.wraps[th, p]  # only wrapped pages were ever touched
        pending[:, :used] = self.pending[:, :used]
        wrapped = np.zeros((t, new_cap), dtype=np.bool_)
        wrapped[:, :used] = self.wrapped[:, :used]
        pending_n = np.zeros((t, new_cap), dtype=np.int64)
        pending_n[:, :used] = self.pending_n[:, :used]
        self.hist, self.wraps, self.wrapped = hist, wraps, wrapped
        self.pending, self.pending_n = pending, pending_n

    def _own(self, t: int) -> tuple[np.ndarray, ...]:
        """Thread t's pending buffers and counts, pages, wraps and flags (2-D, contiguous)."""
        return self.pending[t], self.pending_n[t], self.hist[t], self.wraps[t], self.wrapped[t]

    @property
    def _pages(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hist, wraps, wrapped), with one empty page when there is none (for the kernels)."""
        if self.n_pages:
            return self.hist, self.wraps, self.wrapped
        t = self.threads
        return (
            np.zeros((t, 1, NUM_BUCKETS), np.uint16),
            np.zeros((t, 1, NUM_BUCKETS), np.uint32),
            np.zeros((t, 1), np.bool_),
        )

    # ------------------------------------------------------------------ add
    def add_scores(self, scores: np.ndarray) -> None:
        """Store (M,) float32 scores (no NaN: the caller checks, e.g. with min/max)."""
        bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.int32)
        self._add(bits, True)

    def add(self, keys: np.ndarray) -> None:
        """Store (M,) int32 order keys."""
        self._add(np.ascontiguousarray(keys, dtype=np.int32), False)

    def _add(self, values: np.ndarray, from_float: bool) -> None:
        """One pass per thread share: paged keys to their pages, the others collected sparse.

        Buckets that reach ``page_min`` pixels get pages after the batch (their earlier
        pixels stay sparse until ``compute`` folds them in), while the pages fit in
        ``page_budget`` bytes; beyond it every further bucket stays sparse.
        """
        if values.size == 0:
            return
        parts = shares(values.size, self.threads)
        if self._precount:
            self._promote(self._count(values, from_float, parts))
        sparse = self._scratch([b - a for a, b in parts])

        def scatter(t: int, a: int, b: int) -> int:
            return int(
                self._k.scatter(values, a, b, from_float, self.page_of, sparse[t], *self._own(t))
            )

        written = parallel([functools.partial(scatter, t, a, b) for t, (a, b) in enumerate(parts)])
        self.n_keys += values.size
        self._counts = None
        kept = [part[:n] for part, n in zip(sparse, written, strict=True) if n]
        if kept:
            new = np.concatenate(kept) if len(kept) > 1 else kept[0]
            self._k.count_buckets(new, 0, new.size, False, self.sparse_counts)
            self.sparse.append(new)
            self._grouped = None
        late = self._promote()  # sparse keys of buckets that have just got their pages
        self._precount = late > _PRECOUNT_AFTER * values.size

    def _scratch(self, sizes: list[int]) -> list[np.ndarray]:
        """Per-thread int32 buffers for the sparse keys of a batch, reused across batches."""
        if len(self._buffers) != len(sizes) or any(
            buf.size < n for buf, n in zip(self._buffers, sizes, strict=True)
        ):
            with no_hugepages():
                self._buffers = [np.empty(n, dtype=np.int32) for n in sizes]
        return [buf[:n] for buf, n in zip(self._buffers, sizes, strict=True)]

    def _count(
        self, values: np.ndarray, from_float: bool, parts: list[tuple[int, int]]
    ) -> np.ndarray:
        """Keys per bucket of a batch: (65536,) int64."""
        counts = [np.zeros(NUM_BUCKETS, dtype=np.int64) for _ in parts]
        k = self._k
        parallel(
            [
                functools.partial(k.count_buckets, values, a, b, from_float, counts[t])
                for t, (a, b) in enumerate(parts)
            ]
        )
        return functools.reduce(np.add, counts)

    def _promote(self, coming: np.ndarray | None = None) -> int:
        """Give pages to the buckets that have reached ``page_min`` pixels (within budget).

        Args:
            coming: keys per bucket of a batch about to be stored, counted in.

        Returns:
            The sparse keys already held by the buckets that got pages.
        """
        seen = self.sparse_counts if coming is None else self.sparse_counts + coming
        promote = np.flatnonzero((self.page_of < 0) & (seen >= self.page_min))
        room = max(0, self.page_budget // self.page_bytes - self.n_pages)
        if promote.size > room:  # the densest buckets first
            dense = np.argsort(-seen[promote], kind="stable")[:room]
            promote = np.sort(promote[dense])
        if promote.size <= 0:
            return 0
        self._grow(self.n_pages + promote.size)
        self.page_of[promote] = np.arange(self.n_pages, self.n_pages + promote.size)
        self.n_pages += promote.size
        return int(self.sparse_counts[promote].sum())

    # -------------------------------------------------------------- compute
    def _settle(self) -> tuple[np.ndarray, np.ndarray]:
        """Store the sparse keys of buckets paged meanwhile, fold the pending buffers, and
        group the sparse keys left by bucket.

        Sparse keys of paged buckets (stored before their bucket got pages) go through the
        same ``scatter`` as new keys, on every thread: about 3 ns per key, where grouping
        them by bucket first and folding bucket by bucket took ~15 ns per key.
        """
        k = self._k
        if self._grouped is None:
            keys = self.sparse.view()
            if self.n_pages and keys.size:
                parts = shares(keys.size, self.threads)
                with no_hugepages():
                    out = [np.empty(b - a, dtype=np.int32) for a, b in parts]
                written = parallel(
                    [
                        functools.partial(
                            k.scatter, keys, a, b, False, self.page_of, out[t], *self._own(t)
                        )
                        for t, (a, b) in enumerate(parts)
                    ]
                )
                kept = [o[:n] for o, n in zip(out, written, strict=True)]
                keys = np.concatenate(kept) if len(kept) > 1 else kept[0]
            grouped, _, starts = k.group(keys, np.zeros(0))
            self.sparse = GrowingArray(np.int32)
            self.sparse.append(grouped)
            self._grouped = (self.sparse.view(), starts)
        if self.n_pages and self.pending_n.any():
            parallel(
                [functools.partial(k.fold_pending, *self._own(t)) for t in range(self.threads)]
            )
        if self._counts is None:
            counts = np.diff(self._grouped[1])  # the sparse keys left
            if self.n_pages:
                totals = np.zeros(self.n_pages, dtype=np.int64)
                k.page_totals(self.hist, self.wraps, self.wrapped, self.pending_n, totals)
                paged = np.flatnonzero(self.page_of >= 0)
                counts[paged] += totals[self.page_of[paged]]
            self._counts = counts
        return self._grouped

    def _counts_settled(self) -> np.ndarray:
        self._settle()
        assert self._counts is not None
        return self._counts

    def _page(self, p: int) -> np.ndarray:
        """Counts of page p over all threads: (65536,) int64."""
        counts = self.hist[:, p].sum(axis=0, dtype=np.int64)
        for t in np.flatnonzero(self.wrapped[:, p]):
            counts += self.wraps[t, p].astype(np.int64) << 16
        return counts

    def _mixed(self, pos_keys: np.ndarray, pos_weight: np.ndarray) -> _Mixed:
        """Settle, group the anomalous pixels by bucket, split the mixed buckets."""
        sparse, sparse_starts = self._settle()
        keys, weight, starts = self._k.group(
            np.ascontiguousarray(pos_keys, dtype=np.int32),
            np.ascontiguousarray(pos_weight, dtype=np.float64),
        )
        per_bucket = np.diff(starts)
        counts = self._counts_settled()
        below = np.concatenate(([0], np.cumsum(counts - per_bucket)))  # normal < bucket
        mixed = np.flatnonzero(per_bucket)
        # split the mixed buckets over the threads by their estimated cost: a pass over the
        # 65536 bins of each, plus its anomalous pixels and sparse keys
        sparse_n = np.where(self.page_of[mixed] < 0, counts[mixed], 0)
        cost = np.cumsum(NUM_BUCKETS + 8 * per_bucket[mixed] + sparse_n)
        bounds = [0, 0]
        if mixed.size:
            cuts = np.searchsorted(cost, cost[-1] * np.arange(1, self.threads) / self.threads)
            bounds = [0, *np.maximum.accumulate(cuts).tolist(), mixed.size]
        ranges = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        return _Mixed(sparse, sparse_starts, keys, weight, starts, per_bucket, below, mixed, ranges)

    def rows(self, pos_keys: np.ndarray, pos_weight: np.ndarray) -> ExactRows:
        """Exact rows at every distinct key of the anomalous pixels.

        Args:
            pos_keys: (P,) int32 keys of the anomalous pixels (all of them also added).
            pos_weight: (P,) float64 weight of each anomalous pixel.
        """
        m = self._mixed(pos_keys, pos_weight)
        k = self._k
        distinct = np.zeros(m.mixed.size, dtype=np.int64)
        parallel(
            [
                functools.partial(k.distinct, m.keys, m.starts, m.mixed, a, b, distinct)
                for a, b in m.ranges
            ]
            or [lambda: None]
        )
        offsets = np.concatenate(([0], np.cumsum(distinct)))
        j = int(offsets[-1])
        with no_hugepages():
            out = (
                np.empty(j, np.int32),
                np.empty(j, np.int64),
                np.empty(j, np.int64),
                np.empty(j, np.int64),
                np.empty(j, np.float64),
            )
        common: tuple[np.ndarray, ...] = (m.below, self.page_of, *self._pages, m.sparse)
        common = (*common, m.sparse_starts, m.keys, m.weight, m.starts, m.mixed)
        parallel(
            [functools.partial(k.rows, *common, offsets, a, b, *out) for a, b in m.ranges]
            or [lambda: None]
        )
        return ExactRows(
            keys=out[0], pos=out[1], neg_lt=out[2], neg_eq=out[3], weight=out[4],
            n_neg=int(m.below[-1]),
        )  # fmt: skip

    def metrics(
        self, pos_keys: np.ndarray, pos_weight: np.ndarray, n_regions: int, limit: float
    ) -> tuple[int, int, float, float, float, int]:
        """The one-pass metrics of :func:`_numba_kernels.metrics` without storing the rows.

        The mixed buckets are split into ranges, one per thread; each range walks its rows
        in descending order from the state above it (anomalous pixels and weight above, the
        share of normal pixels above) and the ranges' sums are added exactly (``math.fsum``).

        Returns:
            ``2U``, P, AP, F1-max, the AUPRO area up to ``limit`` (not yet divided) and N.
        """
        m = self._mixed(pos_keys, pos_weight)
        n_neg = int(m.below[-1])
        n_pos = int(m.keys.size)
        if not m.ranges:
            return 0, n_pos, 0.0, -np.inf, 0.0, n_neg
        pos_above = np.concatenate((np.cumsum(m.per_bucket[m.mixed][::-1])[::-1], [0]))
        bucket_w = np.add.reduceat(m.weight, m.starts[m.mixed])
        w_above = np.concatenate((np.cumsum(bucket_w[::-1])[::-1], [0.0]))
        out_u = np.zeros((len(m.ranges), 1), dtype=np.int64)
        out = np.zeros((len(m.ranges), 3), dtype=np.float64)
        calls = []
        for i, (a, b) in enumerate(m.ranges):
            x = (n_neg - m.below[m.mixed[b]]) / max(n_neg, 1) if b < m.mixed.size else 0.0
            start = np.array([pos_above[b], w_above[b], x], dtype=np.float64)
            calls.append(
                functools.partial(
                    self._k.bucket_metrics,
                    m.below,
                    self.page_of,
                    *self._pages,
                    m.sparse,
                    m.sparse_starts,
                    m.keys,
                    m.weight,
                    m.starts,
                    m.mixed,
                    a,
                    b,
                    start,
                    n_neg,
                    n_regions,
                    float(limit),
                    out_u[i],
                    out[i],
                )
            )
        parallel(calls)
        twice_u = int(out_u.sum())
        ap = math.fsum(out[:, 0].tolist()) / max(n_pos, 1)
        area = math.fsum(out[:, 2].tolist())
        return twice_u, n_pos, ap, float(out[:, 1].max()), area, n_neg

    def count_le(self, keys: np.ndarray) -> np.ndarray:
        """Stored keys ``<= k`` for every k of (T,) int32 ``keys``: (T,) int64."""
        sparse, sparse_starts = self._settle()
        keys = np.asarray(keys, dtype=np.int32)
        buckets = (keys >> 16).astype(np.int64) + _OFFSET
        lows = keys.astype(np.int64) & 0xFFFF
        below = np.concatenate(([0], np.cumsum(self._counts_settled())))
        out = below[buckets]
        pages: dict[int, np.ndarray] = {}
        for i, (b, lo) in enumerate(zip(buckets.tolist(), lows.tolist(), strict=True)):
            p = int(self.page_of[b])
            if p >= 0:
                if p not in pages:
                    pages[p] = np.cumsum(self._page(p))
                out[i] += int(pages[p][lo])
            else:
                seg = sparse[sparse_starts[b] : sparse_starts[b + 1]]
                out[i] += int(np.count_nonzero(seg <= keys[i]))
        return out

    def keys(self) -> np.ndarray:
        """All stored keys, ascending: (M,) int32 (to hand over to the sort-based path)."""
        sparse, sparse_starts = self._settle()
        parts = []
        for b in np.flatnonzero(self._counts_settled()).tolist():
            p = int(self.page_of[b])
            if p >= 0:
                row = self._page(p)
                lows = np.flatnonzero(row)
                parts.append(np.repeat(((b - _OFFSET) << 16) | lows, row[lows]))
            else:
                parts.append(np.sort(sparse[sparse_starts[b] : sparse_starts[b + 1]]))
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def label_masked(
    maps: np.ndarray, masks: np.ndarray, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores and regions of the anomalous pixels, compiled (``pixel._anomalous_pixels``).

    Images are split over the threads; each is scanned once (union-find over two rolling
    rows of labels, see ``_numba_kernels.label_masked``).

    Args:
        maps: (B, H, W) scores.
        masks: (B, H, W) bool.
        workers: threads to use (default: :func:`threads`).

    Returns:
        scores (M,) of the anomalous pixels in row-major (B, H, W) order, their region
        index (M,) int32 in 0..n-1 (8-connected, numbered over the batch in order of each
        region's first pixel, never across images), and the sizes (n,) int64.
    """
    k = compiled()
    if k is None:  # pragma: no cover - callers check available()
        raise RuntimeError("the compiled labelling needs numba")
    b = masks.shape[0]
    workers = workers or threads()
    row_counts = np.empty(masks.shape[:2], dtype=np.int64)
    parallel(
        [
            functools.partial(k.count_rows, masks.view(np.uint8), i0, i1, row_counts)
            for i0, i1 in shares(b, max(1, min(workers, b)))
        ]
    )
    per_image = row_counts.sum(axis=1)
    offsets = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(per_image, out=offsets[1:])
    m = int(offsets[-1])
    scores = np.empty(m, dtype=maps.dtype)
    region = np.empty(m, dtype=np.int32)
    sizes = np.empty(m, dtype=np.int64)
    n_regions = np.zeros(b, dtype=np.int64)
    if m:
        busy = np.flatnonzero(per_image)
        cuts = [busy[a:z] for a, z in shares(busy.size, min(workers, busy.size))]
        parallel(
            [
                functools.partial(
                    k.label_masked,
                    masks,
                    maps,
                    row_counts,
                    int(c[0]),
                    int(c[-1]) + 1,
                    offsets,
                    scores,
                    region,
                    sizes,
                    n_regions,
                )
                for c in cuts
                if c.size
            ]
        )
    base = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(n_regions, out=base[1:])
    n = int(base[-1])
    if n >= 2**31:  # pragma: no cover - more regions than int32 holds in one batch
        raise ValueError(f"a batch holds {n} anomalous regions; feed smaller batches")
    # local region numbers to batch numbers, and the sizes of image i from offsets[i] on
    region += np.repeat(base[:-1].astype(np.int32), per_image)
    keep = np.repeat(offsets[:-1] - base[:-1], n_regions) + np.arange(n)
    return scores, region, sizes[keep]
