"""Private: the numba kernels behind ``_kernels.PagedStore`` (imported on first use).

Kept in their own module so that ``import anomalens.metrics`` does not import numba (about
0.5 s) and so that numba can cache the compiled code on disk (``cache=True``). Keys, buckets
and pages are as described in ``_kernels``.

Every kernel is serial and releases the GIL (``nogil=True``); ``PagedStore`` runs one call
per thread on its own share of the work from a thread pool. (Numba's own ``prange`` was 2-3x
slower per element here than the same loop in a serial kernel, even on one thread.)
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import njit

__all__ = [
    "count",
    "distinct",
    "fold_pending",
    "group",
    "numba",
    "rows",
    "scatter",
    "settle_sparse",
]


@njit(cache=True, nogil=True, inline="always")
def _key(v: Any, from_float: bool) -> Any:  # pragma: no cover - compiled
    """Order key of float32 bits ``v`` (``_buckets.order_keys``), or ``v`` itself."""
    if from_float and v < 0:
        return -(v & 0x7FFFFFFF)
    return v


@njit(cache=True, nogil=True)
def count(
    values: Any, start: int, stop: int, from_float: bool, out: Any
) -> Any:  # pragma: no cover
    """Add the bucket of every value in ``values[start:stop]`` to ``out`` (65536,) int64.

    Returns the smallest and largest key and the number of NaN bit patterns (only looked
    for when ``from_float``: ``values`` are float32 bits; else int32 order keys).
    """
    lo = np.int64(2**31 - 1)
    hi = np.int64(-(2**31))
    nan = 0
    for i in range(start, stop):
        v = values[i]
        if from_float and (v & 0x7FFFFFFF) > 0x7F800000:
            nan += 1
            continue
        k = _key(v, from_float)
        out[(k >> 16) + 32768] += 1
        lo = min(lo, k)
        hi = max(hi, k)
    return lo, hi, nan


@njit(cache=True, nogil=True)
def scatter(
    values: Any,
    start: int,
    stop: int,
    from_float: bool,
    t: int,
    page_of: Any,
    sparse_out: Any,
    sparse_at: int,
    pending: Any,
    pending_n: Any,
    hist: Any,
) -> None:  # pragma: no cover - compiled
    """Store ``values[start:stop]`` in thread t's pages (or ``sparse_out`` from ``sparse_at``).

    A paged key's low part goes to the page's pending buffer; a full buffer is folded into
    the page's histogram at once (65536 increments into one 256 KiB page stay in cache).
    """
    cap = pending.shape[2]
    s = sparse_at
    for i in range(start, stop):
        k = _key(values[i], from_float)
        p = page_of[(k >> 16) + 32768]
        if p < 0:
            sparse_out[s] = k
            s += 1
            continue
        c = pending_n[t, p]
        pending[p, t, c] = k & 0xFFFF
        c += 1
        if c == cap:
            for j in range(cap):
                hist[p, t, pending[p, t, j]] += 1
            c = 0
        pending_n[t, p] = c


@njit(cache=True, nogil=True)
def fold_pending(pending: Any, pending_n: Any, hist: Any, t: int) -> None:  # pragma: no cover
    """Fold thread t's pending low parts into its pages."""
    for p in range(pending_n.shape[1]):
        for j in range(pending_n[t, p]):
            hist[p, t, pending[p, t, j]] += 1
        pending_n[t, p] = 0


@njit(cache=True, nogil=True)
def group(keys: Any, weight: Any) -> Any:  # pragma: no cover - compiled
    """Stable counting sort by bucket: keys (M,), weights (M,) (or none), starts (65537,)."""
    starts = np.zeros(65537, np.int64)
    for i in range(keys.size):
        starts[(keys[i] >> 16) + 32769] += 1
    for b in range(65536):
        starts[b + 1] += starts[b]
    fill = starts[:-1].copy()
    out_keys = np.empty(keys.size, np.int32)
    out_weight = np.empty(weight.size, np.float64)
    for i in range(keys.size):
        b = (keys[i] >> 16) + 32768
        out_keys[fill[b]] = keys[i]
        if weight.size:
            out_weight[fill[b]] = weight[i]
        fill[b] += 1
    return out_keys, out_weight, starts


@njit(cache=True, nogil=True)
def settle_sparse(keys: Any, page_of: Any, hist: Any) -> Any:  # pragma: no cover - compiled
    """Group sparse keys by bucket; fold those of paged buckets into thread 0's pages.

    Folding bucket by bucket keeps each page in cache. Returns the remaining keys grouped by
    bucket and their (65537,) starts.
    """
    grouped, _, starts = group(keys, np.zeros(0))
    kept = np.empty(keys.size, np.int32)
    kept_starts = np.zeros(65537, np.int64)
    m = 0
    for b in range(65536):
        kept_starts[b] = m
        p = page_of[b]
        if p >= 0:
            for i in range(starts[b], starts[b + 1]):
                hist[p, 0, grouped[i] & 0xFFFF] += 1
        else:
            for i in range(starts[b], starts[b + 1]):
                kept[m] = grouped[i]
                m += 1
    kept_starts[65536] = m
    return kept[:m].copy(), kept_starts


@njit(cache=True, nogil=True)
def distinct(
    pos_keys: Any, pos_starts: Any, mixed: Any, q0: int, q1: int, out: Any
) -> None:  # pragma: no cover - compiled
    """``out[q] =`` distinct anomalous keys of bucket ``mixed[q]``, for q in [q0, q1)."""
    seen = np.zeros(65536, np.bool_)
    for q in range(q0, q1):
        b = mixed[q]
        d = 0
        for i in range(pos_starts[b], pos_starts[b + 1]):
            low = pos_keys[i] & 0xFFFF
            if not seen[low]:
                seen[low] = True
                d += 1
        for i in range(pos_starts[b], pos_starts[b + 1]):
            seen[pos_keys[i] & 0xFFFF] = False
        out[q] = d


@njit(cache=True, nogil=True)
def rows(
    below: Any,
    page_of: Any,
    hist: Any,
    sparse: Any,
    sparse_starts: Any,
    pos_keys: Any,
    pos_weight: Any,
    pos_starts: Any,
    mixed: Any,
    offsets: Any,
    q0: int,
    q1: int,
    out_keys: Any,
    out_pos: Any,
    out_lt: Any,
    out_eq: Any,
    out_w: Any,
) -> None:  # pragma: no cover - compiled
    """Fill the rows of the mixed buckets ``mixed[q0:q1]`` from ``offsets[q]`` on.

    ``pos_keys``/``pos_weight`` are grouped by bucket (:func:`group`); ``below[b]`` is the
    number of normal pixels in the buckets before b. A bucket's counts of all pixels come
    from its pages (summed over threads) or from its sparse keys.
    """
    nthreads = hist.shape[1]
    cnt = np.zeros(65536, np.int64)
    wsum = np.zeros(65536, np.float64)
    allc = np.zeros(65536, np.int64)
    for q in range(q0, q1):
        b = mixed[q]
        for i in range(pos_starts[b], pos_starts[b + 1]):
            low = pos_keys[i] & 0xFFFF
            cnt[low] += 1
            wsum[low] += pos_weight[i]
        p = page_of[b]
        if p >= 0:
            for t in range(nthreads):
                for low in range(65536):
                    allc[low] += hist[p, t, low]
        else:
            for i in range(sparse_starts[b], sparse_starts[b + 1]):
                allc[sparse[i] & 0xFFFF] += 1
        run_all = below[b]
        run_pos = 0
        j = offsets[q]
        high = (b - 32768) << 16
        for low in range(65536):
            a = allc[low]
            k = cnt[low]
            if k > 0:
                out_keys[j] = high | low
                out_pos[j] = k
                out_lt[j] = run_all - run_pos
                out_eq[j] = a - k
                out_w[j] = wsum[low]
                j += 1
                cnt[low] = 0
                wsum[low] = 0.0
            run_all += a
            run_pos += k
            allc[low] = 0
