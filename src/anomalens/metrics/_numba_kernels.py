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
    "count_keys",
    "distinct",
    "fold_pending",
    "group",
    "metrics",
    "numba",
    "page_totals",
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
def scatter(
    values: Any,
    start: int,
    stop: int,
    from_float: bool,
    t: int,
    page_of: Any,
    sparse_out: Any,
    pending: Any,
    pending_n: Any,
    hist: Any,
) -> int:  # pragma: no cover - compiled
    """Store ``values[start:stop]`` in thread t's pages, or in ``sparse_out``.

    A paged key's low part goes to the page's pending buffer; a full buffer is folded into
    the page's histogram at once (65536 increments into one 256 KiB page stay in cache).
    Nothing else is touched per key (bucket counts come from the pages and the sparse keys).

    Returns:
        The number of keys written to ``sparse_out`` (which holds ``stop - start``).
    """
    cap = pending.shape[2]
    s = 0
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
    return s


@njit(cache=True, nogil=True)
def count_keys(keys: Any, counts: Any) -> None:  # pragma: no cover - compiled
    """Add the bucket of every int32 key to ``counts`` (65536,) int64."""
    for i in range(keys.size):
        counts[(keys[i] >> 16) + 32768] += 1


@njit(cache=True, nogil=True)
def page_totals(hist: Any, pending_n: Any, out: Any) -> None:  # pragma: no cover - compiled
    """Pixels held by every page (its histograms over all threads plus its pending ones)."""
    for p in range(out.size):
        total = 0
        for t in range(hist.shape[1]):
            total += pending_n[t, p]
            for low in range(65536):
                total += hist[p, t, low]
        out[p] = total


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


@njit(cache=True, nogil=True)
def metrics(
    pos: Any, neg_lt: Any, neg_eq: Any, weight: Any, n_neg: int, n_regions: int, limit: float
) -> Any:  # pragma: no cover - compiled
    """AUROC (as 2U), AP, F1-max and the AUPRO area in one pass over ascending rows.

    The same definitions as ``_curves`` (``auroc_from_summary``, ``ap_from_summary``,
    ``f1max_from_summary``, ``aupro_from_summary``), walked in descending score order; the
    float sums are compensated (Neumaier), so they match numpy's pairwise sums to ~1e-16.

    Returns:
        ``2U`` (int64), P, AP, F1-max and the AUPRO area up to ``limit`` (not yet divided).
    """
    j_rows = pos.size
    n_pos = 0
    for r in range(j_rows):
        n_pos += pos[r]
    twice_u = 0
    tps = 0
    ap = 0.0
    ap_c = 0.0
    f1 = -np.inf
    area = 0.0
    area_c = 0.0
    cum_w = 0.0
    pro_prev = 0.0
    x_end = 0.0  # where the previous diagonal ended
    open_ = n_regions > 0 and n_neg > 0  # still integrating the PRO curve
    for r in range(j_rows - 1, -1, -1):
        p = pos[r]
        ge = n_neg - neg_lt[r]
        twice_u += p * (2 * neg_lt[r] + neg_eq[r])
        tps += p
        term = p * (tps / (tps + ge))
        t = ap + term
        ap_c += (ap - t) + term if abs(ap) >= abs(term) else (term - t) + ap
        ap = t
        f1 = max(f1, 2.0 * tps / (n_pos + tps + ge))
        if not open_:
            continue
        cum_w += weight[r]
        pro = cum_w / n_regions
        x_gt = (ge - neg_eq[r]) / n_neg
        x_ge = ge / n_neg
        # horizontal step x_end -> x_gt at pro_prev, then the diagonal x_gt -> x_ge
        for x0, x1, y0, y1 in ((x_end, x_gt, pro_prev, pro_prev), (x_gt, x_ge, pro_prev, pro)):
            if x1 <= limit:
                term = (x1 - x0) * (y0 + y1) / 2.0
            elif x0 < limit:
                y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                term = (limit - x0) * (y0 + y_at) / 2.0
                open_ = False
            else:
                open_ = False
                break
            t = area + term
            area_c += (area - t) + term if abs(area) >= abs(term) else (term - t) + area
            area = t
            if not open_:
                break
        pro_prev = pro
        x_end = x_ge
    if open_ and x_end < limit:  # last step to (1, PRO_last)
        area += (min(1.0, limit) - x_end) * pro_prev
    return twice_u, n_pos, (ap + ap_c) / max(n_pos, 1), f1, area + area_c
