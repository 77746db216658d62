"""Private: the compiled exact store of the pixel metrics (numba kernels on a thread pool).

The exact metrics need, at every distinct anomalous score ``v``, the number of normal pixels
below ``v`` and equal to ``v``. :class:`PagedStore` keeps the exact count of every float32
value seen, at O(1) work per pixel and with no comparison sort:

* A pixel's int32 *order key* (``_buckets.order_keys``: same order and equality as the
  floats) splits into a *bucket* (high 16 bits) and a *low part* (low 16 bits).
* A bucket that has received at least ``PAGE_MIN`` pixels owns a *page* per thread: a
  65536-bin histogram of its low parts (uint32 counts, widened to uint64 before any count
  could overflow). A paged pixel's low part is first appended to its page's *pending*
  buffer, and a full buffer (``PENDING`` low parts) is folded into the histogram at once:
  65536 increments into one 256 KiB page stay in the CPU cache, whereas incrementing the
  histogram once per pixel misses the cache nearly every time (~11-15 ns per pixel here,
  against ~2 ns this way).
* Pixels of a bucket with fewer pixels are kept as raw int32 keys (*sparse*, 4 bytes per
  pixel), so scores spread thinly over many exponents never allocate pages; at ``compute``
  they are grouped by bucket (counting sort) and those of buckets paged meanwhile folded in.

Each batch is split into T contiguous shares, one per thread (``ANOMALENS_METRIC_THREADS``,
default: the CPU count); thread t only writes its own pages and pending buffers, so no
locks are needed, and ``compute`` adds the T pages of a bucket up. The kernels are serial
numba functions that release the GIL, run on a small thread pool.

``compute`` walks the buckets that hold anomalous pixels (grouped by a counting sort), each
bucket's all-pixel counts from its pages or sparse keys, and emits one row per distinct
anomalous key with the exact normal counts below and equal: linear time, buckets split over
the threads. The result is identical to the numpy ``BucketStore`` and to the sort path.

Memory: T x (256 KiB histogram + 128 KiB pending) per paged bucket, at most ``PAGE_BUDGET``
(2 GiB; further buckets stay sparse), plus 4 bytes per sparse pixel. The page arrays are
allocated without numpy's huge-page advice (see :func:`_no_hugepages`). Without numba (or with ``ANOMALENS_NO_NUMBA=1``) the numpy ``BucketStore`` is used:
same results, 2 bytes per pixel, several times slower.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np

from anomalens.metrics._buckets import NUM_BUCKETS, ExactRows, GrowingArray

__all__ = ["PAGE_BUDGET", "PAGE_MIN", "PENDING", "PagedStore", "available", "compiled", "threads"]

log = logging.getLogger(__name__)

_OFFSET = 1 << 15
PAGE_MIN = 1 << 16  # pixels a bucket needs before it gets its pages
PENDING = 1 << 16  # low parts buffered per page and thread before they are folded
PAGE_BUDGET = 2 << 30  # bytes of pages at most (then further buckets stay sparse)
_FIRST_PAGES = 256  # page capacity of the first allocation
_U32_LIMIT = (1 << 32) - 1


@contextlib.contextmanager
def _no_hugepages() -> Iterator[None]:
    """Allocate without numpy's transparent-huge-page advice.

    numpy advises huge pages for arrays of 4 MiB and more; where the kernel then compacts
    memory on the page fault (``defrag=madvise``) first touches of the pages cost far more
    than the counting itself (measured here: storing a pixel went from 3.8 to 4.8 ns).
    """
    toggle = getattr(getattr(np, "_core", np).multiarray, "_set_madvise_hugepage", None)
    if toggle is None:  # pragma: no cover - private numpy switch gone: keep the default
        yield
        return
    previous = toggle(False)
    try:
        yield
    finally:
        toggle(previous)


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


def _parallel(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run the calls (GIL-free kernels) on the pool; the first one on this thread."""
    if len(calls) == 1:
        return [calls[0]()]
    futures = [_pool(len(calls) - 1).submit(c) for c in calls[1:]]
    first = calls[0]()
    return [first, *(f.result() for f in futures)]


def _shares(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) shares of range(n)."""
    step = -(-n // parts)
    return [(min(n, t * step), min(n, (t + 1) * step)) for t in range(parts)]


class PagedStore:
    """Exact counts of every int32 order key added (see the module docstring).

    Args:
        page_min: pixels a bucket needs before it gets pages.
        pending: low parts buffered per page and thread before a fold.
        page_budget: bytes the pages may take in all; further buckets stay sparse.
    """

    def __init__(
        self, page_min: int = PAGE_MIN, pending: int = PENDING, page_budget: int = PAGE_BUDGET
    ) -> None:
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
        self.hist = np.zeros((0, t, NUM_BUCKETS), dtype=np.uint32)
        self.pending = np.zeros((0, t, int(pending)), dtype=np.uint16)
        self.pending_n = np.zeros((t, 0), dtype=np.int64)  # (thread, page): no false sharing
        self.sparse = GrowingArray(np.int32)
        self._grouped: tuple[np.ndarray, np.ndarray] | None = None  # sparse keys by bucket
        self._buffers: list[np.ndarray] = []

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
        """Bytes held (pages, pending buffers, sparse keys, tables)."""
        arrays = (self.sparse_counts, self.page_of, self.hist, self.pending, self.pending_n)
        grouped = self._grouped[1].nbytes if self._grouped else 0
        return int(sum(a.nbytes for a in arrays) + self.sparse.data.nbytes + grouped)

    @property
    def page_bytes(self) -> int:
        """Bytes of one bucket's pages and pending buffers (all threads)."""
        return self.threads * (NUM_BUCKETS * self.hist.itemsize + 2 * self.pending.shape[2])

    def _grow(self, n_pages: int) -> None:
        """Room for ``n_pages`` pages: fresh zeroed arrays (the OS zeroes pages lazily, on
        first touch) with the old pages copied in, capacity doubling."""
        cap, t, _ = self.hist.shape
        if n_pages <= cap:
            return
        new_cap = max(n_pages, 2 * cap, _FIRST_PAGES)
        with _no_hugepages():
            hist = np.zeros((new_cap, t, NUM_BUCKETS), dtype=self.hist.dtype)
            pending = np.zeros((new_cap, t, self.pending.shape[2]), dtype=np.uint16)
        hist[:cap] = self.hist
        pending[:cap] = self.pending
        pending_n = np.zeros((t, new_cap), dtype=np.int64)
        pending_n[:, :cap] = self.pending_n
        self.hist, self.pending, self.pending_n = hist, pending, pending_n

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
        if self.hist.dtype == np.uint32 and self.size + values.size > _U32_LIMIT:
            self.hist = self.hist.astype(np.uint64)  # a single value could pass 2**32 - 1
        shares = _shares(values.size, self.threads)
        sparse = self._scratch([b - a for a, b in shares])
        state = (self.pending, self.pending_n, self.hist)

        def scatter(t: int, a: int, b: int) -> int:
            k = self._k
            return int(k.scatter(values, a, b, from_float, t, self.page_of, sparse[t], *state))

        written = _parallel(
            [functools.partial(scatter, t, a, b) for t, (a, b) in enumerate(shares)]
        )
        self.n_keys += values.size
        self._counts = None
        kept = [part[:n] for part, n in zip(sparse, written, strict=True) if n]
        if kept:
            new = np.concatenate(kept) if len(kept) > 1 else kept[0]
            self._k.count_keys(new, self.sparse_counts)
            self.sparse.append(new)
            self._grouped = None
        self._promote()

    def _scratch(self, sizes: list[int]) -> list[np.ndarray]:
        """Per-thread int32 buffers for the sparse keys of a batch, reused across batches."""
        if len(self._buffers) != len(sizes) or any(
            buf.size < n for buf, n in zip(self._buffers, sizes, strict=True)
        ):
            with _no_hugepages():
                self._buffers = [np.empty(n, dtype=np.int32) for n in sizes]
        return [buf[:n] for buf, n in zip(self._buffers, sizes, strict=True)]

    def _promote(self) -> None:
        """Give pages to the buckets that have reached ``page_min`` pixels (within budget)."""
        promote = np.flatnonzero((self.page_of < 0) & (self.sparse_counts >= self.page_min))
        room = max(0, self.page_budget // self.page_bytes - self.n_pages)
        if promote.size > room:  # the densest buckets first
            dense = np.argsort(-self.sparse_counts[promote], kind="stable")[:room]
            promote = np.sort(promote[dense])
        if promote.size <= 0:
            return
        self._grow(self.n_pages + promote.size)
        self.page_of[promote] = np.arange(self.n_pages, self.n_pages + promote.size)
        self.n_pages += promote.size

    # -------------------------------------------------------------- compute
    def _settle(self) -> tuple[np.ndarray, np.ndarray]:
        """Fold pending buffers and paged sparse keys; group the other sparse keys by bucket."""
        if self.n_pages and self.pending_n.any():
            k = self._k
            _parallel(
                [
                    functools.partial(k.fold_pending, self.pending, self.pending_n, self.hist, t)
                    for t in range(self.threads)
                ]
            )
        if self._grouped is None:
            hist = self.hist if self.n_pages else np.zeros((1, 1, NUM_BUCKETS), np.uint32)
            kept, starts = self._k.settle_sparse(self.sparse.view(), self.page_of, hist)
            self.sparse = GrowingArray(np.int32)
            self.sparse.append(kept)
            self._grouped = (self.sparse.view(), starts)
        if self._counts is None:
            counts = np.diff(self._grouped[1])  # the sparse keys left
            if self.n_pages:
                totals = np.zeros(self.n_pages, dtype=np.int64)
                self._k.page_totals(self.hist, self.pending_n, totals)
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
        return self.hist[p].sum(axis=0, dtype=np.int64)

    def rows(self, pos_keys: np.ndarray, pos_weight: np.ndarray) -> ExactRows:
        """Exact rows at every distinct key of the anomalous pixels.

        Args:
            pos_keys: (P,) int32 keys of the anomalous pixels (all of them also added).
            pos_weight: (P,) float64 weight of each anomalous pixel.
        """
        sparse, sparse_starts = self._settle()
        keys, weight, starts = self._k.group(
            np.ascontiguousarray(pos_keys, dtype=np.int32),
            np.ascontiguousarray(pos_weight, dtype=np.float64),
        )
        per_bucket = np.diff(starts)
        counts = self._counts_settled()
        below = np.concatenate(([0], np.cumsum(counts - per_bucket)))  # normal < bucket
        mixed = np.flatnonzero(per_bucket)
        # split the mixed buckets over the threads by their number of pixels
        bounds = [0, 0]
        if mixed.size:
            cum = np.cumsum(counts[mixed])
            cuts = np.searchsorted(cum, cum[-1] * np.arange(1, self.threads) / self.threads)
            bounds = [0, *np.maximum.accumulate(cuts).tolist(), mixed.size]
        ranges = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        distinct = np.zeros(mixed.size, dtype=np.int64)
        k = self._k
        _parallel(
            [functools.partial(k.distinct, keys, starts, mixed, a, b, distinct) for a, b in ranges]
            or [lambda: None]
        )
        offsets = np.concatenate(([0], np.cumsum(distinct)))
        j = int(offsets[-1])
        out = (
            np.empty(j, np.int32),
            np.empty(j, np.int64),
            np.empty(j, np.int64),
            np.empty(j, np.int64),
            np.empty(j, np.float64),
        )
        hist = self.hist if self.n_pages else np.zeros((1, 1, NUM_BUCKETS), np.uint32)
        common = (below, self.page_of, hist, sparse, sparse_starts, keys, weight, starts, mixed)
        _parallel(
            [functools.partial(k.rows, *common, offsets, a, b, *out) for a, b in ranges]
            or [lambda: None]
        )
        return ExactRows(
            keys=out[0], pos=out[1], neg_lt=out[2], neg_eq=out[3], weight=out[4],
            n_neg=int(below[-1]),
        )  # fmt: skip

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
