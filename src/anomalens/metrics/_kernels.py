"""Private: compiled (numba) kernels of the exact pixel metrics, and the store built on them.

The exact metrics need, at every distinct anomalous score ``v``, the number of normal pixels
below ``v`` and equal to ``v``. :class:`PagedStore` keeps the exact count of every float32
value seen, in a form that costs O(1) per pixel and no comparison sort:

* A pixel's int32 *order key* (``_buckets.order_keys``) splits into a bucket (high 16 bits)
  and a low part (low 16 bits).
* A bucket that has received at least ``PAGE_MIN`` pixels owns a *page*: a 65536-bin
  histogram of its low parts (uint32 counts, widened to uint64 before any count could
  overflow). Pixels of a paged bucket are first appended to the page's small *pending*
  buffer of low parts and folded into the histogram when the buffer is full, so the
  histogram's cache lines are touched in bursts instead of once per pixel (a direct
  increment per pixel is ~15 ns here: every increment misses the cache).
* Pixels of a bucket below ``PAGE_MIN`` are kept as raw int32 keys (*sparse*), 4 bytes per
  pixel, so scores spread thinly over many exponents never allocate pages.

Memory is therefore about 320 KiB per paged bucket plus 4 bytes per sparse pixel, instead of
the 2 bytes per pixel of ``_buckets.BucketStore`` (1725 maps of 518 x 518: ~0.3 GB vs 0.9 GB).

``compute`` folds everything pending, then walks the buckets in ascending order with the
anomalous pixels grouped per bucket (counting sort) and reads every row off the page (or a
histogram of the bucket's sparse keys): linear time. The kernels run on ``numba`` threads
(``ANOMALENS_METRIC_THREADS``, default: numba's thread count, i.e. the CPU count): each
thread owns a contiguous range of buckets, balanced by the batch's pixel counts, so no two
threads write the same page. Without numba the numpy ``BucketStore`` is used instead (same
results, about 4x slower); ``ANOMALENS_NO_NUMBA=1`` forces that fallback.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from anomalens.metrics._buckets import NUM_BUCKETS, ExactRows, GrowingArray, keys_to_float32

__all__ = [
    "PAGE_MIN",
    "PENDING",
    "Counted",
    "PagedStore",
    "available",
    "compiled",
    "numba_threads",
]

log = logging.getLogger(__name__)

_OFFSET = 1 << 15
PAGE_MIN = 1 << 17  # pixels a bucket needs before it gets its pages
PENDING = 1 << 16  # low parts buffered per page before they are folded into its histogram
_U32_LIMIT = (1 << 32) - 1
_I32 = (-(1 << 31), (1 << 31) - 1)
# numba's default ("workqueue") thread pool must not be entered from two threads at once
_LOCK = threading.Lock()


def _disabled() -> bool:
    return os.environ.get("ANOMALENS_NO_NUMBA", "").strip() not in ("", "0")


def numba_threads() -> int:
    """Threads the kernels use: ``ANOMALENS_METRIC_THREADS`` or numba's current count."""
    kernels = compiled()
    if kernels is None:
        return 1
    numba = kernels.numba
    raw = os.environ.get("ANOMALENS_METRIC_THREADS", "").strip()
    limit = int(getattr(numba.config, "NUMBA_NUM_THREADS", 1))
    if raw:
        try:
            return max(1, min(int(raw), limit))
        except ValueError as err:
            raise ValueError(f"ANOMALENS_METRIC_THREADS must be an integer, got {raw!r}") from err
    return max(1, min(int(numba.get_num_threads()), limit))


def available() -> bool:
    """Whether the compiled kernels can be used (numba importable, not switched off)."""
    return compiled() is not None


@functools.cache
def compiled() -> SimpleNamespace | None:
    """The numba kernels, defined on first use (``import numba`` alone takes ~0.5 s).

    Returns None when numba cannot be imported or ``ANOMALENS_NO_NUMBA=1``; the callers then
    use the numpy ``BucketStore``. Compiled code is cached on disk (numba ``cache=True``), so
    only the first run on a machine pays the compilation (a few seconds).
    """
    if _disabled():
        return None
    try:
        from anomalens.metrics import _numba_kernels
    except ImportError as err:  # pragma: no cover - numba is a dependency
        log.warning("numba is not available (%s): exact pixel metrics use the numpy path", err)
        return None
    return SimpleNamespace(
        **{name: getattr(_numba_kernels, name) for name in _numba_kernels.__all__}
    )


def _balanced_cuts(counts: np.ndarray, parts: int) -> np.ndarray:
    """(parts + 1,) bucket boundaries splitting ``counts`` into ranges of similar totals."""
    if parts <= 1:
        return np.array([0, NUM_BUCKETS], np.int64)
    cum = np.cumsum(counts)
    targets = cum[-1] * np.arange(1, parts) / parts
    inner = np.searchsorted(cum, targets, side="left") + 1
    return np.concatenate(([0], np.maximum.accumulate(inner), [NUM_BUCKETS])).astype(np.int64)


@dataclass(frozen=True)
class Counted:
    """A batch counted by :meth:`PagedStore.count`, ready for :meth:`PagedStore.add_scores`.

    Attributes:
        values: (M,) int32 float bits (``from_float``) or order keys.
        from_float: whether ``values`` are float32 bits.
        local: (T, 65536) int64 pixels per bucket in each thread's share.
        lo: smallest score (float32; ``+inf`` for an all-NaN batch).
        hi: largest score (float32; ``-inf`` for an all-NaN batch).
        nan: number of NaN scores.
    """

    values: np.ndarray
    from_float: bool
    local: np.ndarray
    lo: np.float32
    hi: np.float32
    nan: int


class PagedStore:
    """Exact counts of every int32 order key added (see the module docstring).

    Every thread of the kernels owns its own pages and pending buffers (``hist[:, t]``,
    ``pending[:, t]``), filled from its contiguous share of each batch, so threads never
    write the same memory; ``rows`` adds the threads' pages up. The thread count is fixed
    when the store is created. Pages are the leading axis, so adding pages grows the arrays
    in place (``ndarray.resize``: a realloc, usually an ``mremap`` without copying).
    """

    def __init__(self, page_min: int = PAGE_MIN, pending: int = PENDING) -> None:
        if page_min < 1 or pending < 1:
            raise ValueError(f"page_min and pending must be >= 1, got {page_min}, {pending}")
        kernels = compiled()
        if kernels is None:
            raise RuntimeError(
                "the paged store needs numba (pip install numba), or set ANOMALENS_NO_NUMBA=1 "
                "to use the numpy store"
            )
        self._k = kernels
        self.page_min = int(page_min)
        self.threads = numba_threads()
        t = self.threads
        self.counts = np.zeros(NUM_BUCKETS, dtype=np.int64)  # all pixels per bucket
        self.page_of = np.full(NUM_BUCKETS, -1, dtype=np.int32)
        self.n_pages = 0
        self.hist = np.zeros((0, t, NUM_BUCKETS), dtype=np.uint32)
        self.pending = np.zeros((0, t, int(pending)), dtype=np.uint16)
        self.pending_n = np.zeros((t, 0), dtype=np.int64)  # (thread, page): no false sharing
        self.sparse = GrowingArray(np.int32)
        self._grouped: tuple[np.ndarray, np.ndarray] | None = None  # sparse keys by bucket

    @property
    def size(self) -> int:
        """Number of keys added."""
        return int(self.counts.sum())

    @property
    def nbytes(self) -> int:
        """Bytes held (pages, pending buffers, sparse keys, tables)."""
        arrays = (self.counts, self.page_of, self.hist, self.pending, self.pending_n)
        grouped = self._grouped[1].nbytes if self._grouped else 0
        return int(sum(a.nbytes for a in arrays) + self.sparse.data.nbytes + grouped)

    def _grow(self, n_pages: int) -> None:
        cap, t, _ = self.hist.shape
        if n_pages <= cap:
            return
        new_cap = max(n_pages, 2 * cap, 64)
        for array in (self.hist, self.pending):  # new rows are zero-filled
            array.resize((new_cap, *array.shape[1:]), refcheck=False)
        pending_n = np.zeros((t, new_cap), dtype=np.int64)
        pending_n[:, :cap] = self.pending_n
        self.pending_n = pending_n

    def count(self, scores: np.ndarray) -> Counted:
        """First half of :meth:`add_scores`: count a batch without storing it.

        Args:
            scores: (M,) float32 scores.

        Returns:
            The batch's bucket counts, its min and max score and the number of NaN.
        """
        bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.int32)
        return self._count(bits, True)

    def _count(self, values: np.ndarray, from_float: bool) -> Counted:
        with _LOCK:
            local, lo, hi, nan = self._k.count_buckets(values, self.threads, from_float)
        lo_hi = keys_to_float32(np.array([lo, hi], dtype=np.int64).clip(*_I32))
        return Counted(values, from_float, local, lo_hi[0], lo_hi[1], int(nan))

    def add_scores(self, counted: Counted) -> None:
        """Store a batch counted by :meth:`count` (which must have found no NaN)."""
        if counted.nan:
            raise ValueError("scores contain NaN")
        self._add(counted)

    def add(self, keys: np.ndarray) -> None:
        """Count (M,) int32 order keys."""
        keys = np.ascontiguousarray(keys, dtype=np.int32)
        self._add(self._count(keys, False))

    def _add(self, counted: Counted) -> None:
        local = counted.local
        if counted.values.size == 0:
            return
        total = self.counts + local.sum(axis=0)
        if self.hist.dtype == np.uint32 and int(total.sum()) > _U32_LIMIT:
            self.hist = self.hist.astype(np.uint64)  # a single value could pass 2**32 - 1
        promote = np.flatnonzero((self.page_of < 0) & (total >= self.page_min))
        if promote.size:
            self._grow(self.n_pages + promote.size)
            self.page_of[promote] = np.arange(self.n_pages, self.n_pages + promote.size)
            self.n_pages += promote.size
        self.counts = total
        per_thread = local[:, self.page_of < 0].sum(axis=1)
        starts = np.concatenate(([0], np.cumsum(per_thread)))
        sparse_out = np.empty(int(starts[-1]), dtype=np.int32)
        with _LOCK:
            self._k.scatter(counted.values, counted.from_float, self.page_of, starts, sparse_out,
                     self.pending, self.pending_n, self.hist)  # fmt: skip
        if sparse_out.size:
            self.sparse.append(sparse_out)
            self._grouped = None

    def _settle(self) -> tuple[np.ndarray, np.ndarray]:
        """Fold pending buffers and paged sparse keys; group the other sparse keys by bucket."""
        with _LOCK:
            if self.n_pages:
                self._k.fold_pending(self.pending, self.pending_n, self.hist)
        if self._grouped is None:
            keys = self.sparse.view()
            if self.n_pages and keys.size:
                keys = self._k.fold_sparse(keys, self.page_of, self.hist)
            grouped, _, starts = self._k.group(keys, np.zeros(0))
            self.sparse = GrowingArray(np.int32)
            self.sparse.append(grouped)
            self._grouped = (self.sparse.view(), starts)
        return self._grouped

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
        hist = self.hist
        if not self.n_pages:
            hist = np.zeros((1, self.threads, NUM_BUCKETS), self.hist.dtype)
        with _LOCK:
            out = self._k.rows(
                self.counts, self.page_of, hist, sparse, sparse_starts, keys, weight, starts
            )
        keys, pos, lt, eq, weight, n_neg = out
        return ExactRows(keys=keys, pos=pos, neg_lt=lt, neg_eq=eq, weight=weight, n_neg=int(n_neg))

    def count_le(self, keys: np.ndarray) -> np.ndarray:
        """Stored keys ``<= k`` for every k of (T,) int32 ``keys``: (T,) int64."""
        sparse, sparse_starts = self._settle()
        keys = np.asarray(keys, dtype=np.int32)
        buckets = (keys >> 16).astype(np.int64) + _OFFSET
        lows = keys.astype(np.int64) & 0xFFFF
        below = np.concatenate(([0], np.cumsum(self.counts)))
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
        for b in np.flatnonzero(self.counts).tolist():
            p = int(self.page_of[b])
            if p >= 0:
                row = self._page(p)
                lows = np.flatnonzero(row)
                parts.append(np.repeat(((b - _OFFSET) << 16) | lows, row[lows]))
            else:
                parts.append(np.sort(sparse[sparse_starts[b] : sparse_starts[b + 1]]))
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
