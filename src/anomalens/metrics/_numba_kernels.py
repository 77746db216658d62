"""Private: the numba kernels behind ``_kernels.PagedStore`` (imported on first use).

Kept in their own module so that ``import anomalens.metrics`` does not import numba (about
0.5 s) and so that numba can cache the compiled code on disk (``cache=True``). Keys, buckets
and pages are as described in ``_kernels``.

Every kernel is serial and releases the GIL (``nogil=True``); ``PagedStore`` runs one call
per thread on its own share of the work from a thread pool. (Numba's own ``prange`` was 2-3x
slower per element here than the same loop in a serial kernel, even on one thread.)
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
from numba import njit

__all__ = [
    "bin_counts",
    "bucket_metrics",
    "count_buckets",
    "count_rows",
    "distinct",
    "fold_pending",
    "group",
    "label_masked",
    "metrics",
    "numba",
    "page_totals",
    "rows",
    "scatter",
]


@njit(cache=True, nogil=True, inline="always")
def _key(v: Any, from_float: bool) -> Any:  # pragma: no cover - compiled
    """Order key of float32 bits ``v`` (``_buckets.order_keys``), or ``v`` itself."""
    if from_float:  # -(v & 0x7FFFFFFF) for negative v, v otherwise, without a branch
        sign = v >> 31
        return ((v & 0x7FFFFFFF) ^ sign) - sign
    return v


@njit(cache=True, nogil=True, inline="always")
def _bump(hist: Any, wraps: Any, wrapped: Any, p: Any, low: Any) -> None:  # pragma: no cover
    """``hist[p, low] += 1`` on one thread's uint16 pages; a wrap to 0 adds one to ``wraps``.

    ``wraps[p, low]`` counts units of 65536 (a bin's count is ``hist + 65536 * wraps``) and
    ``wrapped[p]`` flags the pages that have any, so that readers skip ``wraps`` (and its
    memory is never touched) where it is all zero.
    """
    x = hist[p, low] + 1  # numba widens the sum (to 65536 at a wrap), numpy would wrap
    hist[p, low] = x
    if x & 0xFFFF == 0:
        wraps[p, low] += 1
        wrapped[p] = True


@njit(cache=True, nogil=True, inline="always")
def _fold(pending: Any, hist: Any, wraps: Any, wrapped: Any, p: Any, n: int) -> None:
    """Fold the first n pending low parts of page p into its histogram (one thread's)."""
    for j in range(n):
        _bump(hist, wraps, wrapped, p, np.uint32(pending[p, j]))


@njit(cache=True, nogil=True)
def scatter(
    values: Any,
    start: int,
    stop: int,
    from_float: bool,
    page_of: Any,
    sparse_out: Any,
    pending: Any,
    pending_n: Any,
    hist: Any,
    wraps: Any,
    wrapped: Any,
) -> int:  # pragma: no cover - compiled
    """Store ``values[start:stop]`` in one thread's pages, or in ``sparse_out``.

    A paged key's low part goes to the page's pending buffer; a full buffer is folded into
    the page's histogram at once (65536 increments into one 128 KiB page stay in cache).
    Nothing else is touched per key (bucket counts come from the pages and the sparse keys).
    The arrays are the thread's own (``PagedStore.hist[t]`` etc.: 2-D, contiguous), and
    indices are unsigned so that numba adds no negative-index wraparound (together ~20 %
    faster than indexing the 3-D arrays).

    Returns:
        The number of keys written to ``sparse_out`` (which holds ``stop - start``).
    """
    cap = pending.shape[1]
    s = 0
    for i in range(start, stop):
        v = values[i]
        if from_float:  # order key without a branch on the sign (mixed signs mispredict)
            sign = v >> 31
            v = ((v & 0x7FFFFFFF) ^ sign) - sign
        p = page_of[np.uint32((v >> 16) + 32768)]
        if p < 0:
            sparse_out[s] = v
            s += 1
            continue
        pu = np.uint32(p)
        c = pending_n[pu]
        pending[pu, np.uint32(c)] = v & 0xFFFF
        c += 1
        if c == cap:
            _fold(pending, hist, wraps, wrapped, pu, cap)
            c = 0
        pending_n[pu] = c
    return s


@njit(cache=True, nogil=True)
def count_buckets(
    values: Any, start: int, stop: int, from_float: bool, counts: Any
) -> None:  # pragma: no cover - compiled
    """Add the bucket of every key of ``values[start:stop]`` to ``counts`` (65536,) int64."""
    for i in range(start, stop):
        counts[(_key(values[i], from_float) >> 16) + 32768] += 1


@njit(cache=True, nogil=True)
def bin_counts(
    values: Any, start: int, stop: int, origin: Any, width: Any, offset: int, shift: int, hist: Any
) -> None:  # pragma: no cover - compiled
    """Binned mode: ``hist[(floor((v - origin) / width) - offset) >> shift] += 1``.

    For ``values[start:stop]``, with the float operations of ``PixelMetricAccumulator._fine``
    in the dtype of ``values`` (the caller passes ``origin`` and ``width`` of that dtype), so
    every pixel lands in the bin the numpy path gives it.
    """
    for i in range(start, stop):
        fine = np.int64(math.floor((values[i] - origin) / width))
        hist[(fine - offset) >> shift] += 1


@njit(cache=True, nogil=True)
def page_totals(
    hist: Any, wraps: Any, wrapped: Any, pending_n: Any, out: Any
) -> None:  # pragma: no cover - compiled
    """Pixels held by every page (its histograms over all threads plus its pending ones)."""
    for p in range(out.size):
        total = 0
        for t in range(hist.shape[0]):
            total += pending_n[t, p]
            for low in range(65536):
                total += hist[t, p, low]
            if wrapped[t, p]:
                for low in range(65536):
                    total += np.int64(wraps[t, p, low]) << 16
        out[p] = total


@njit(cache=True, nogil=True)
def fold_pending(
    pending: Any, pending_n: Any, hist: Any, wraps: Any, wrapped: Any
) -> None:  # pragma: no cover - compiled
    """Fold one thread's pending low parts into its pages (its 2-D arrays)."""
    for p in range(pending_n.size):
        _fold(pending, hist, wraps, wrapped, np.uint32(p), pending_n[p])
        pending_n[p] = 0


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


@njit(cache=True, nogil=True, inline="always")
def _bucket_work() -> Any:  # pragma: no cover - compiled
    """Per-low scratch of :func:`_bucket_rows` (kept zero between buckets)."""
    return np.zeros(65536, np.int64), np.zeros(65536, np.float64), np.zeros(65536, np.int64)


@njit(cache=True, nogil=True, inline="always")
def _bucket_rows(
    b: int,
    below: Any,
    page_of: Any,
    hist: Any,
    wraps: Any,
    wrapped: Any,
    sparse: Any,
    sparse_starts: Any,
    pos_keys: Any,
    pos_weight: Any,
    pos_starts: Any,
    work: Any,
    j: int,
    out: Any,
) -> int:  # pragma: no cover - compiled
    """The rows of mixed bucket b, ascending, written to ``out`` from row j on.

    ``out`` is (keys, pos, lt, eq, w): one row per distinct anomalous key of the bucket with
    its anomalous pixels, the normal pixels below and equal, and the sum of their weights.
    ``pos_keys``/``pos_weight`` are grouped by bucket (:func:`group`); ``below[b]`` is the
    number of normal pixels in the buckets before b. The bucket's counts of all pixels come
    from its pages (summed over threads) or from its sparse keys. Returns the next free row.
    """
    cnt, wsum, allc = work
    out_keys, out_pos, out_lt, out_eq, out_w = out
    for i in range(pos_starts[b], pos_starts[b + 1]):
        low = pos_keys[i] & 0xFFFF
        cnt[low] += 1
        wsum[low] += pos_weight[i]
    p = page_of[b]
    if p >= 0:
        for t in range(hist.shape[0]):
            for low in range(65536):
                allc[low] += hist[t, p, low]
            if wrapped[t, p]:
                for low in range(65536):
                    allc[low] += np.int64(wraps[t, p, low]) << 16
    else:
        for i in range(sparse_starts[b], sparse_starts[b + 1]):
            allc[sparse[i] & 0xFFFF] += 1
    run_all = below[b]
    run_pos = 0
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
    return j


@njit(cache=True, nogil=True)
def rows(
    below: Any,
    page_of: Any,
    hist: Any,
    wraps: Any,
    wrapped: Any,
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
    """Fill the rows (:func:`_bucket_rows`) of the mixed buckets ``mixed[q0:q1]``, those of
    bucket ``mixed[q]`` from ``offsets[q]`` on."""
    work = _bucket_work()
    out = (out_keys, out_pos, out_lt, out_eq, out_w)
    for q in range(q0, q1):
        _bucket_rows(
            mixed[q], below, page_of, hist, wraps, wrapped, sparse, sparse_starts, pos_keys,
            pos_weight, pos_starts, work, offsets[q], out,
        )  # fmt: skip


# state of the one-pass metrics walk (``_step``): floats and integers
_AP, _AP_C, _F1, _AREA, _AREA_C, _CUM_W, _PRO, _X = 0, 1, 2, 3, 4, 5, 6, 7
_U, _TPS, _OPEN = 0, 1, 2


@njit(cache=True, nogil=True, inline="always")
def _add(fs: Any, i: int, c: int, term: float) -> None:  # pragma: no cover - compiled
    """``fs[i] += term`` with the Neumaier compensation kept in ``fs[c]``."""
    t = fs[i] + term
    if abs(fs[i]) >= abs(term):
        fs[c] += (fs[i] - t) + term
    else:
        fs[c] += (term - t) + fs[i]
    fs[i] = t


@njit(cache=True, nogil=True, inline="always")
def _segment(
    fs: Any, ist: Any, x0: float, x1: float, y0: float, y1: float, limit: float
) -> bool:  # pragma: no cover - compiled
    """Add the trapezoid x0 -> x1 of the PRO curve, clipped at the FPR ``limit``.

    Returns whether the integration is still open (the limit not yet reached).
    """
    if x1 <= limit:
        term = (x1 - x0) * (y0 + y1) / 2.0
    elif x0 < limit:
        y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        term = (limit - x0) * (y0 + y_at) / 2.0
        ist[_OPEN] = 0
    else:
        ist[_OPEN] = 0
        return False
    _add(fs, _AREA, _AREA_C, term)
    return ist[_OPEN] != 0


@njit(cache=True, nogil=True, inline="always")
def _step(
    fs: Any,
    ist: Any,
    p: int,
    lt: int,
    eq: int,
    w: float,
    n_neg: int,
    n_pos: int,
    n_regions: int,
    limit: float,
) -> None:  # pragma: no cover - compiled
    """One row (a distinct anomalous score, walked in descending order) into the metrics.

    The same definitions as ``_curves`` (``auroc_from_summary``, ``ap_from_summary``,
    ``f1max_from_summary``, ``aupro_from_summary``): p anomalous pixels at the score, lt
    and eq normal pixels below and equal, w the sum of their 1/|region|.
    """
    ge = n_neg - lt
    ist[_U] += p * (2 * lt + eq)
    ist[_TPS] += p
    tps = ist[_TPS]
    _add(fs, _AP, _AP_C, p * (tps / (tps + ge)))
    fs[_F1] = max(fs[_F1], 2.0 * tps / (n_pos + tps + ge))
    if not ist[_OPEN]:
        return
    fs[_CUM_W] += w
    pro = fs[_CUM_W] / n_regions
    x_gt = (ge - eq) / n_neg
    x_ge = ge / n_neg
    pro_prev = fs[_PRO]
    # horizontal step from the previous diagonal's end to x_gt at pro_prev, then the
    # diagonal x_gt -> x_ge (tied normal and anomalous pixels cross together)
    if _segment(fs, ist, fs[_X], x_gt, pro_prev, pro_prev, limit):
        _segment(fs, ist, x_gt, x_ge, pro_prev, pro, limit)
    fs[_PRO] = pro
    fs[_X] = x_ge


@njit(cache=True, nogil=True, inline="always")
def _tail(fs: Any, ist: Any, x_stop: float, limit: float) -> None:  # pragma: no cover
    """The horizontal PRO step from the last diagonal's end to ``x_stop`` (clipped)."""
    if ist[_OPEN] and fs[_X] < limit:
        _add(fs, _AREA, _AREA_C, (min(x_stop, limit) - fs[_X]) * fs[_PRO])
    fs[_X] = x_stop


@njit(cache=True, nogil=True)
def metrics(
    pos: Any, neg_lt: Any, neg_eq: Any, weight: Any, n_neg: int, n_regions: int, limit: float
) -> Any:  # pragma: no cover - compiled
    """AUROC (as 2U), AP, F1-max and the AUPRO area in one pass over ascending rows.

    Walked in descending score order (``_step``); the float sums are compensated
    (Neumaier), so they match numpy's pairwise sums to ~1e-16.

    Returns:
        ``2U`` (int64), P, AP, F1-max and the AUPRO area up to ``limit`` (not yet divided).
    """
    n_pos = 0
    for r in range(pos.size):
        n_pos += pos[r]
    fs = np.zeros(8)
    fs[_F1] = -np.inf
    ist = np.zeros(3, np.int64)
    ist[_OPEN] = n_regions > 0 and n_neg > 0
    for r in range(pos.size - 1, -1, -1):
        _step(fs, ist, pos[r], neg_lt[r], neg_eq[r], weight[r], n_neg, n_pos, n_regions, limit)
    _tail(fs, ist, 1.0, limit)  # last step to (1, PRO_last)
    ap = (fs[_AP] + fs[_AP_C]) / max(n_pos, 1)
    return ist[_U], n_pos, ap, fs[_F1], fs[_AREA] + fs[_AREA_C]


@njit(cache=True, nogil=True)
def bucket_metrics(
    below: Any,
    page_of: Any,
    hist: Any,
    wraps: Any,
    wrapped: Any,
    sparse: Any,
    sparse_starts: Any,
    pos_keys: Any,
    pos_weight: Any,
    pos_starts: Any,
    mixed: Any,
    q0: int,
    q1: int,
    start: Any,
    n_neg: int,
    n_regions: int,
    limit: float,
    out_u: Any,
    out: Any,
) -> None:  # pragma: no cover - compiled
    """:func:`metrics` over the rows of the mixed buckets ``mixed[q0:q1]``, never stored.

    Each bucket's rows (:func:`_bucket_rows`) go to a 65536-row scratch and are walked in
    descending order. The walk starts from the state above ``mixed[q1 - 1]``: ``start``
    holds the anomalous pixels above, the sum of their weights and x (the share of normal
    pixels above); it ends with the horizontal PRO step down to the first key of
    ``mixed[q0]`` (to x = 1 for the lowest range). ``out_u[0]`` gets 2U of this range and
    ``out`` the compensated AP sum, F1-max and the compensated AUPRO area.
    """
    work = _bucket_work()
    scratch = (
        np.empty(65536, np.int32),
        np.empty(65536, np.int64),
        np.empty(65536, np.int64),
        np.empty(65536, np.int64),
        np.empty(65536, np.float64),
    )
    _, r_pos, r_lt, r_eq, r_w = scratch
    n_pos = pos_keys.size
    fs = np.zeros(8)
    fs[_F1] = -np.inf
    fs[_CUM_W] = start[1]
    fs[_PRO] = start[1] / n_regions if n_regions > 0 else 0.0
    fs[_X] = start[2]
    ist = np.zeros(3, np.int64)
    ist[_TPS] = np.int64(start[0])
    ist[_OPEN] = n_regions > 0 and n_neg > 0 and start[2] < limit
    for q in range(q1 - 1, q0 - 1, -1):
        m = _bucket_rows(
            mixed[q], below, page_of, hist, wraps, wrapped, sparse, sparse_starts, pos_keys,
            pos_weight, pos_starts, work, 0, scratch,
        )  # fmt: skip
        for r in range(m - 1, -1, -1):
            _step(fs, ist, r_pos[r], r_lt[r], r_eq[r], r_w[r], n_neg, n_pos, n_regions, limit)
    x_stop = 1.0 if q0 == 0 else (n_neg - below[mixed[q0]]) / max(n_neg, 1)
    _tail(fs, ist, x_stop, limit)
    out_u[0] = ist[_U]
    out[0] = fs[_AP] + fs[_AP_C]
    out[1] = fs[_F1]
    out[2] = fs[_AREA] + fs[_AREA_C]


@njit(cache=True, nogil=True, inline="always")
def _root(parent: Any, x: int) -> int:  # pragma: no cover - compiled
    """Root of x in the union-find forest ``parent`` (with path halving)."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(cache=True, nogil=True, inline="always")
def _join(parent: Any, a: int, b: int) -> int:  # pragma: no cover - compiled
    """Merge the sets of a and b under the smaller root; return that root."""
    ra = _root(parent, a)
    rb = _root(parent, b)
    if ra < rb:
        parent[rb] = ra
        return ra
    parent[ra] = rb
    return rb


@njit(cache=True, nogil=True)
def count_rows(masks: Any, i0: int, i1: int, out: Any) -> None:  # pragma: no cover - compiled
    """``out[i, r] =`` the nonzero bytes of ``masks[i, r]`` (uint8 view of the bool masks)
    for images ``i0..i1-1``; a branch-free sum that the compiler vectorises."""
    for i in range(i0, i1):
        for r in range(masks.shape[1]):
            total = 0
            for c in range(masks.shape[2]):
                total += masks[i, r, c]
            out[i, r] = total


@njit(cache=True, nogil=True)
def label_masked(
    masks: Any,
    maps: Any,
    row_counts: Any,
    i0: int,
    i1: int,
    offsets: Any,
    out_scores: Any,
    out_region: Any,
    out_sizes: Any,
    n_regions: Any,
) -> None:  # pragma: no cover - compiled
    """Anomalous pixels of images ``i0..i1-1``, with the 8-connected region of each.

    One raster scan per image with union-find over provisional labels (two rolling rows of
    labels, no label image), then a renumbering pass. Image i's masked pixels are written, in
    row-major order, to ``out_scores`` and ``out_region`` from ``offsets[i]`` on: the score
    and the region's index within the image (0..k-1). Regions are numbered in order of their
    first pixel in the raster scan, as ``scipy.ndimage.label`` numbers them. The k region
    sizes go to ``out_sizes[offsets[i]:offsets[i] + k]`` (an image has at most as many
    regions as masked pixels) and k to ``n_regions[i]``.

    Args:
        masks: (B, H, W) bool.
        maps: (B, H, W) scores.
        row_counts: (B, H) anomalous pixels per row (:func:`count_rows`); empty rows are
            skipped.
        offsets: (B + 1,) int64, the first output slot of every image.
    """
    h, w = masks.shape[1], masks.shape[2]
    prev = np.zeros(w, np.int32)
    cur = np.zeros(w, np.int32)
    parent = np.zeros(1, np.int32)
    final = np.zeros(1, np.int32)
    for i in range(i0, i1):
        j0 = offsets[i]
        if offsets[i + 1] == j0:
            n_regions[i] = 0
            continue
        limit = offsets[i + 1] - j0 + 1  # provisional labels needed at most
        if parent.size < limit:
            parent = np.zeros(limit, np.int32)
            final = np.zeros(limit, np.int32)
        prev[:] = 0
        prev_clear = True
        n_labels = 0
        j = j0
        for r in range(h):
            if row_counts[i, r] == 0:  # most rows have no anomalous pixel
                if not prev_clear:
                    prev[:] = 0
                    prev_clear = True
                continue
            prev_clear = False
            left = 0
            for c in range(w):
                if not masks[i, r, c]:
                    cur[c] = 0
                    left = 0
                    continue
                lab = left
                up = prev[c]
                if up:
                    lab = up if lab == 0 else (lab if lab == up else _join(parent, lab, up))
                if c > 0 and prev[c - 1] and not up:
                    nb = prev[c - 1]
                    lab = nb if lab == 0 else (lab if lab == nb else _join(parent, lab, nb))
                if c + 1 < w and prev[c + 1] and not up:
                    nb = prev[c + 1]
                    lab = nb if lab == 0 else (lab if lab == nb else _join(parent, lab, nb))
                if lab == 0:
                    n_labels += 1
                    parent[n_labels] = n_labels
                    lab = n_labels
                cur[c] = lab
                left = lab
                out_scores[j] = maps[i, r, c]
                out_region[j] = lab
                j += 1
            prev, cur = cur, prev
        # renumber: a root is the smallest provisional label of its set, i.e. the label of
        # the region's first pixel, so counting roots in label order numbers the regions in
        # order of their first pixel
        k = 0
        for x in range(1, n_labels + 1):
            rt = _root(parent, x)
            if rt == x:
                final[x] = k
                out_sizes[j0 + k] = 0
                k += 1
            else:
                final[x] = final[rt]
        for q in range(j0, j):
            region = final[out_region[q]]
            out_region[q] = region
            out_sizes[j0 + region] += 1
        n_regions[i] = k
