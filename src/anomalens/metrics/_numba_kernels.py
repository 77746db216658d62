"""Private: the numba kernels behind ``_kernels.PagedStore`` (imported on first use).

Kept in their own module so that ``import anomalens.metrics`` does not import numba (about
0.5 s) and so that numba can cache the compiled code on disk (``cache=True``). Every kernel
is documented where ``PagedStore`` calls it; keys, buckets and pages are as described in
``_kernels``.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import njit, prange

__all__ = ["count_buckets", "fold_pending", "fold_sparse", "group", "numba", "rows", "scatter"]


@njit(cache=True, nogil=True, inline="always")
def _key(v: Any, from_float: bool) -> Any:  # pragma: no cover - compiled
    """Order key of float32 bits ``v`` (``_buckets.order_keys``), or ``v`` itself."""
    if from_float and v < 0:
        return -(v & 0x7FFFFFFF)
    return v


@njit(cache=True, nogil=True, parallel=True)
def _count_buckets(values: Any, nthreads: int, from_float: bool) -> Any:  # pragma: no cover
    """Pixels per bucket in each thread's contiguous share of ``values``.

    Returns (T, 65536) counts, the smallest and largest key, and the number of NaN bit
    patterns (``from_float``: ``values`` are float32 bits; else int32 keys).
    """
    n = values.size
    local = np.zeros((nthreads, 65536), np.int64)
    lo = np.full(nthreads, np.iinfo(np.int32).max, np.int64)
    hi = np.full(nthreads, np.iinfo(np.int32).min, np.int64)
    nan = np.zeros(nthreads, np.int64)
    step = (n + nthreads - 1) // nthreads
    for t in prange(nthreads):
        h = local[t]
        t_lo, t_hi, t_nan = lo[t], hi[t], 0
        for i in range(t * step, min(n, (t + 1) * step)):
            v = values[i]
            if from_float and (v & 0x7FFFFFFF) > 0x7F800000:
                t_nan += 1
                continue
            k = _key(v, from_float)
            h[(k >> 16) + 32768] += 1
            t_lo = min(t_lo, k)
            t_hi = max(t_hi, k)
        lo[t], hi[t], nan[t] = t_lo, t_hi, t_nan
    return local, lo.min(), hi.max(), nan.sum()


@njit(cache=True, nogil=True, parallel=True)
def _scatter(
    values: Any,
    from_float: bool,
    page_of: Any,
    sparse_start: Any,
    sparse_out: Any,
    pending: Any,
    pending_n: Any,
    hist: Any,
) -> None:  # pragma: no cover - compiled
    """Thread t takes the t-th contiguous share of ``keys`` into its own pages."""
    nthreads = hist.shape[1]
    cap = pending.shape[2]
    n = values.size
    step = (n + nthreads - 1) // nthreads
    for t in prange(nthreads):
        s = sparse_start[t]
        for i in range(t * step, min(n, (t + 1) * step)):
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


@njit(cache=True, nogil=True, parallel=True)
def _fold_pending(pending: Any, pending_n: Any, hist: Any) -> None:  # pragma: no cover
    for t in prange(hist.shape[1]):
        for p in range(hist.shape[0]):
            for j in range(pending_n[t, p]):
                hist[p, t, pending[p, t, j]] += 1
            pending_n[t, p] = 0


@njit(cache=True, nogil=True)
def _fold_sparse(keys: Any, page_of: Any, hist: Any) -> Any:  # pragma: no cover - compiled
    """Fold sparse keys of paged buckets into thread 0's pages; return the others."""
    keep = np.empty(keys.size, np.int32)
    m = 0
    for i in range(keys.size):
        k = keys[i]
        p = page_of[(k >> 16) + 32768]
        if p >= 0:
            hist[p, 0, k & 0xFFFF] += 1
        else:
            keep[m] = k
            m += 1
    return keep[:m].copy()


@njit(cache=True, nogil=True)
def _group(keys: Any, weight: Any) -> Any:  # pragma: no cover - compiled
    """Stable counting sort by bucket: keys (M,), weights (M,), starts (65537,)."""
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


@njit(cache=True, nogil=True, parallel=True)
def _rows(
    counts: Any,
    page_of: Any,
    hist: Any,
    sparse: Any,
    sparse_starts: Any,
    pos_keys: Any,
    pos_weight: Any,
    pos_starts: Any,
) -> Any:  # pragma: no cover - compiled
    """Rows at every distinct anomalous key; buckets handled in parallel.

    ``pos_keys``/``pos_weight`` are grouped by bucket (``_group``). Pass 1 counts the
    distinct keys per bucket (their output offsets), pass 2 fills the rows.
    """
    mixed = np.flatnonzero(pos_starts[1:] > pos_starts[:-1])
    m = mixed.size
    nthreads = hist.shape[1]
    # normal pixels below each bucket
    below = np.zeros(65537, np.int64)
    for b in range(65536):
        below[b + 1] = below[b] + counts[b] - (pos_starts[b + 1] - pos_starts[b])
    distinct = np.zeros(m + 1, np.int64)
    chunks = max(1, min(m, 4 * nthreads))
    step = (m + chunks - 1) // chunks if m else 1
    for c in prange(chunks):
        seen = np.zeros(65536, np.bool_)
        for q in range(c * step, min(m, (c + 1) * step)):
            b = mixed[q]
            d = 0
            for i in range(pos_starts[b], pos_starts[b + 1]):
                low = pos_keys[i] & 0xFFFF
                if not seen[low]:
                    seen[low] = True
                    d += 1
            for i in range(pos_starts[b], pos_starts[b + 1]):
                seen[pos_keys[i] & 0xFFFF] = False
            distinct[q + 1] = d
    for q in range(m):
        distinct[q + 1] += distinct[q]
    j_total = distinct[m]
    out_keys = np.empty(j_total, np.int32)
    out_pos = np.empty(j_total, np.int64)
    out_lt = np.empty(j_total, np.int64)
    out_eq = np.empty(j_total, np.int64)
    out_w = np.empty(j_total, np.float64)
    for c in prange(chunks):
        cnt = np.zeros(65536, np.int64)
        wsum = np.zeros(65536, np.float64)
        allc = np.zeros(65536, np.int64)
        for q in range(c * step, min(m, (c + 1) * step)):
            b = mixed[q]
            for i in range(pos_starts[b], pos_starts[b + 1]):
                low = pos_keys[i] & 0xFFFF
                cnt[low] += 1
                wsum[low] += pos_weight[i]
            p = page_of[b]
            if p >= 0:
                for t in range(nthreads):
                    row = hist[p, t]
                    for low in range(65536):
                        allc[low] += row[low]
            else:
                for i in range(sparse_starts[b], sparse_starts[b + 1]):
                    allc[sparse[i] & 0xFFFF] += 1
            run_all = below[b]
            run_pos = 0
            j = distinct[q]
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
    return out_keys, out_pos, out_lt, out_eq, out_w, below[65536]


count_buckets, scatter, fold_pending = _count_buckets, _scatter, _fold_pending
fold_sparse, group, rows = _fold_sparse, _group, _rows
