"""Private helpers: exact rank counts of float32 scores without sorting the normal pixels.

Every float32 score maps to an int32 *order key* with the same order and the same equality
(``-0.0`` and ``+0.0`` share key 0): a non-negative float keeps its bit pattern, a negative
one becomes minus its magnitude bits. A key splits into a *bucket* (its high 16 bits, offset
to ``0..65535``) and a *low part* (its low 16 bits, ``uint16``); keys order by (bucket, low).

Normal pixels are kept as their low parts grouped by bucket (:class:`BucketStore`, 2 bytes per
pixel); the grouping is a stable counting sort, O(n). At ``compute``, each bucket that holds
anomalous pixels gets one 65536-bin histogram of its normal low parts, which gives the exact
number of normal pixels below and equal to every distinct anomalous score in the bucket; a
bucket without anomalous pixels only contributes its size. Nothing is compared, so the cost
is linear and independent of the CPU's sort kernel. Anomalous pixels (a few percent) are
grouped the same way. :func:`torch_rows` runs the same two-level histogram with torch ops on
the maps' own device (a GPU), indexing the histogram directly instead of grouping first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

try:  # the compiled counting sort behind ``csr_array.tocsc()``, called to reuse buffers
    from scipy.sparse._sparsetools import csr_tocsc as _csr_tocsc
except ImportError:  # pragma: no cover - private name; the public conversion is the fallback
    _csr_tocsc = None

if TYPE_CHECKING:
    import torch

__all__ = [
    "NUM_BUCKETS",
    "BucketStore",
    "ExactRows",
    "GrowingArray",
    "bucket_rows",
    "group_by_bucket",
    "keys_to_float32",
    "order_keys",
    "remove_sorted",
    "torch_order_keys",
    "torch_rows",
]

NUM_BUCKETS = 1 << 16
_OFFSET = 1 << 15  # bucket = (key >> 16) + _OFFSET, in 0..65535
_GROUP_CHUNK = 1 << 22  # keys grouped per counting-sort call (fastest of 2**20..2**23 here)
# Buckets with fewer items than this are handled by a stable (radix) sort of their uint16 low
# parts instead of a 65536-bin histogram; both give the same counts.
_SMALL_BUCKET = 1 << 14
_TORCH_BINS = 1 << 26  # histogram bins per pass in the torch path (512 MiB of int64)
_TORCH_BINS_CPU = 1 << 22  # the same for CPU tensors (tests)


class GrowingArray:
    """A 1-D array that grows in place (``ndarray.resize``: realloc, no second copy)."""

    def __init__(self, dtype: np.dtype | type = np.float32) -> None:
        self.data = np.empty(0, dtype=dtype)
        self.size = 0

    def astype(self, dtype: np.dtype) -> None:
        """Widen the stored dtype (lossless widening only happens here)."""
        if self.data.dtype != dtype:
            self.data = self.data[: self.size].astype(dtype)

    def append(self, values: np.ndarray) -> None:
        """Append (M,) values, widening the dtype if needed."""
        self.astype(np.result_type(self.data.dtype, values.dtype))
        need = self.size + values.size
        if need > self.data.size:
            grown = max(need, self.data.size + self.data.size // 2, 1 << 14)
            self.data.resize(grown, refcheck=False)
        self.data[self.size : need] = values
        self.size = need

    def trim(self) -> None:
        """Release the spare capacity."""
        if self.data.size != self.size:
            self.data.resize(self.size, refcheck=False)

    def view(self) -> np.ndarray:
        """(size,) view of the stored values."""
        return self.data[: self.size]


# ----------------------------------------------------------------------------- keys
def order_keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving int32 keys of float32 scores (no NaN).

    ``a < b`` iff ``key(a) < key(b)`` and ``a == b`` iff ``key(a) == key(b)`` (so
    ``key(-0.0) == key(0.0) == 0``; ``-inf`` and ``inf`` are the extreme keys).

    Args:
        x: (M,) float32 scores.

    Returns:
        (M,) int32 keys; a view of ``x`` when no score has its sign bit set.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32)
    negative = bits < 0
    if not negative.any():
        return bits
    keys = bits.copy()
    keys[negative] = -(keys[negative] & 0x7FFFFFFF)
    return keys


def keys_to_float32(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`order_keys` (``-0.0`` comes back as ``0.0``): (M,) float32."""
    bits = np.array(keys, dtype=np.int32, copy=True)
    negative = bits < 0
    bits[negative] = (-bits[negative]) | np.int32(-(2**31))
    return bits.view(np.float32)


def _split(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Buckets (M,) int32 in 0..65535 and low parts (M,) uint16 of int32 keys."""
    buckets = keys >> 16
    buckets += _OFFSET
    return buckets, keys.astype(np.uint16)  # the cast keeps the low 16 bits


def group_by_bucket(
    buckets: np.ndarray,
    payload: np.ndarray,
    num_buckets: int = NUM_BUCKETS,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stable counting sort of ``payload`` by ``buckets``, O(M + num_buckets).

    scipy's CSR -> CSC conversion of a one-row matrix whose column indices are the buckets is
    exactly this counting sort (count per column, prefix sum, one scatter pass in input
    order), compiled; numpy has no such primitive and its argsort is comparison based.

    Args:
        buckets: (M,) int32 bucket of every item, in ``0..num_buckets - 1``.
        payload: (M,) values to group (any numeric dtype).
        num_buckets: number of buckets B.
        out: optional reusable buffers (grouped (>= M,) of the payload dtype, rows (>= M,)
            int32, starts (B + 1,) int32) for M < 2**31; avoids fresh allocations per call.

    Returns:
        ``grouped`` (M,) payload ordered by bucket, input order kept inside a bucket, and
        ``starts`` (B + 1,) with bucket b at ``grouped[starts[b]:starts[b + 1]]``.
    """
    n = int(payload.size)
    if n == 0:
        return payload[:0].copy(), np.zeros(num_buckets + 1, dtype=np.int64)
    if out is not None and _csr_tocsc is not None and n < 2**31:
        grouped, rows, starts = out[0][:n], out[1][:n], out[2]
        indptr = np.array([0, n], dtype=np.int32)
        _csr_tocsc(1, num_buckets, indptr, buckets, payload, starts, rows, grouped)
        return grouped, starts
    index_dtype = np.int32 if n < 2**31 else np.int64
    indptr = np.array([0, n], dtype=index_dtype)
    matrix = sparse.csr_array(
        (payload, buckets.astype(index_dtype, copy=False), indptr), shape=(1, num_buckets)
    )
    grouped_csc = matrix.tocsc()
    return grouped_csc.data, grouped_csc.indptr.astype(np.int64, copy=False)


class BucketStore:
    """Low parts of int32 keys grouped by bucket: 2 bytes per key, O(M) per add.

    Each ``add`` groups its keys by bucket (counting sort, in chunks) and appends the grouped
    low parts to one growing array, recording where every non-empty bucket's segment lies;
    :meth:`low` gathers a bucket's segments.
    """

    def __init__(self) -> None:
        self.counts = np.zeros(NUM_BUCKETS, dtype=np.int64)
        self.data = GrowingArray(np.uint16)
        self._segments: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # bucket, begin, end
        self._index: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
        self._scratch: tuple[np.ndarray, ...] | None = None
        self._gather = np.zeros(0, np.uint16)

    @property
    def size(self) -> int:
        """Number of keys stored."""
        return int(self.counts.sum())

    @property
    def nbytes(self) -> int:
        """Bytes held (allocated low parts, counts and segment table)."""
        table = sum(a.nbytes for seg in self._segments for a in seg)
        return int(self.counts.nbytes + self.data.data.nbytes + table + self._gather.nbytes)

    def add(self, keys: np.ndarray) -> None:
        """Store (M,) int32 keys."""
        if self._scratch is None:  # reused: fresh pages cost more than the work on them
            m = _GROUP_CHUNK
            self._scratch = (
                np.empty(m, np.int32),
                np.empty(m, np.uint16),
                np.empty(m, np.uint16),
                np.empty(m, np.int32),
                np.empty(NUM_BUCKETS + 1, np.int32),
            )
        bucket_buf, low_buf, *out = self._scratch
        for start in range(0, keys.size, _GROUP_CHUNK):
            chunk = keys[start : start + _GROUP_CHUNK]
            buckets, lows = bucket_buf[: chunk.size], low_buf[: chunk.size]
            np.right_shift(chunk, 16, out=buckets)
            buckets += _OFFSET
            np.copyto(lows, chunk, casting="unsafe")  # keeps the low 16 bits
            grouped, starts = group_by_bucket(buckets, lows, out=tuple(out))
            sizes = np.diff(starts)
            self.counts += sizes
            used = np.flatnonzero(sizes)
            offset = self.data.size
            self.data.append(grouped)
            begin = starts[used].astype(np.int64) + offset
            self._segments.append((used.astype(np.int32), begin, begin + sizes[used]))
        self._index = None

    def low(self, bucket: int) -> np.ndarray:
        """(n_b,) uint16 low parts stored in ``bucket``; valid until the next call."""
        if self._index is None:
            self.data.trim()  # compute time: release the growth slack
            if self._segments:
                buckets, begin, end = (np.concatenate(c) for c in zip(*self._segments, strict=True))
            else:
                buckets = begin = end = np.zeros(0, np.int64)
            order = np.argsort(buckets, kind="stable")
            buckets, begin, end = buckets[order], begin[order], end[order]
            cuts = np.flatnonzero(np.diff(buckets)) + 1
            self._index = {
                int(g[0]): (b, e)
                for g, b, e in zip(
                    np.split(buckets, cuts), np.split(begin, cuts), np.split(end, cuts), strict=True
                )
                if g.size
            }
        found = self._index.get(bucket)
        if found is None:
            return np.zeros(0, np.uint16)
        data = self.data.view()
        begin, end = found
        if begin.size == 1:
            return data[begin[0] : end[0]]
        total = int(np.sum(end - begin))
        if self._gather.size < total:
            self._gather = np.empty(total, np.uint16)
        out = self._gather[:total]
        np.concatenate(
            [data[b:e] for b, e in zip(begin.tolist(), end.tolist(), strict=True)], out=out
        )
        return out

    def buckets(self) -> list[int]:
        """Non-empty buckets, ascending."""
        return np.flatnonzero(self.counts).tolist()

    def keys(self) -> np.ndarray:
        """All stored keys, ascending: (M,) int32 (for the sort-based reference path)."""
        parts = []
        for b in self.buckets():
            low = np.sort(self.low(b), kind="stable")
            parts.append(((b - _OFFSET) << 16) | low.astype(np.int32))
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def rows(self, pos_keys: np.ndarray, pos_weight: np.ndarray) -> ExactRows:
        """:func:`bucket_rows` of this store (the interface of ``_kernels.PagedStore``)."""
        return bucket_rows(self, pos_keys, pos_weight)

    def count_le(self, keys: np.ndarray) -> np.ndarray:
        """Stored keys ``<= k`` for every k of (T,) int32 ``keys``: (T,) int64."""
        buckets, lows = _split(np.asarray(keys, dtype=np.int32))
        below = np.concatenate(([0], np.cumsum(self.counts)))
        out = below[buckets]
        for i, (b, lo) in enumerate(zip(buckets.tolist(), lows.tolist(), strict=True)):
            out[i] += int(np.count_nonzero(self.low(b) <= lo))
        return out


# ----------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class ExactRows:
    """Exact counts at every distinct positive score, ascending.

    Attributes:
        keys: (J,) int32 order keys of the distinct positive scores.
        pos: (J,) int64 positives at each score.
        neg_lt: (J,) int64 negatives strictly below each score.
        neg_eq: (J,) int64 negatives equal to each score.
        weight: (J,) float64 sum of the positives' weights (``1/|R_k|``) at each score.
        n_neg: total negatives N.
    """

    keys: np.ndarray
    pos: np.ndarray
    neg_lt: np.ndarray
    neg_eq: np.ndarray
    weight: np.ndarray
    n_neg: int


def _group_lows(low: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct values (asc, int64), counts and weight sums of (m,) uint16 ``low``."""
    if low.size >= _SMALL_BUCKET:
        counts = np.bincount(low, minlength=NUM_BUCKETS)
        values = np.flatnonzero(counts)
        sums = np.bincount(low, weights=weight, minlength=NUM_BUCKETS)[values]
        return values, counts[values], sums
    order = np.argsort(low, kind="stable")
    low = low[order]
    starts = np.flatnonzero(np.concatenate(([True], low[1:] != low[:-1])))
    counts = np.diff(np.append(starts, low.size))
    return low[starts].astype(np.int64), counts, np.add.reduceat(weight[order], starts)


def _below_and_equal(low: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items of (n,) uint16 ``low`` below and equal to each of (J,) ascending ``values``."""
    if low.size >= _SMALL_BUCKET:
        hist = np.bincount(low, minlength=NUM_BUCKETS)
        at = hist[values]
        return np.cumsum(hist)[values] - at, at
    low = np.sort(low, kind="stable")  # radix sort for uint16
    lt = np.searchsorted(low, values, side="left")
    return lt, np.searchsorted(low, values, side="right") - lt


def bucket_rows(store: BucketStore, pos_keys: np.ndarray, pos_weight: np.ndarray) -> ExactRows:
    """Exact rows from the buckets of *all* pixels and the anomalous pixels' keys.

    The normal pixels' counts are those of all pixels minus those of the anomalous ones, so
    ``update`` never has to separate the normal pixels.

    Args:
        store: the keys of all pixels, normal and anomalous.
        pos_keys: (P,) int32 keys of the anomalous pixels.
        pos_weight: (P,) float64 weight of each anomalous pixel.
    """
    index = np.arange(pos_keys.size, dtype=np.int32 if pos_keys.size < 2**31 else np.int64)
    buckets, lows = _split(pos_keys)
    order, starts = group_by_bucket(buckets, index)
    del index
    below = np.concatenate(([0], np.cumsum(store.counts - np.diff(starts))))  # normal < bucket
    parts: list[tuple[np.ndarray, ...]] = []
    for b in np.flatnonzero(np.diff(starts)).tolist():
        idx = order[starts[b] : starts[b + 1]]
        values, counts, sums = _group_lows(lows[idx], pos_weight[idx])
        lt, eq = _below_and_equal(store.low(b), values)
        lt -= np.cumsum(counts) - counts  # anomalous pixels below, in this bucket
        eq -= counts
        keys = ((b - _OFFSET) << 16) | values
        parts.append((keys, counts, lt + below[b], eq, sums))
    return _rows(parts, int(below[-1]))


def remove_sorted(keys: np.ndarray, remove: np.ndarray) -> np.ndarray:
    """Multiset difference of two ascending arrays (``remove`` contained in ``keys``): (M,)."""
    values, counts = np.unique(remove, return_counts=True)
    first = np.searchsorted(keys, values, side="left")
    offsets = np.cumsum(counts) - counts
    drop = np.repeat(first - offsets, counts) + np.arange(int(counts.sum()))
    keep = np.ones(keys.size, dtype=bool)
    keep[drop] = False
    return keys[keep]


def _rows(parts: list[tuple[np.ndarray, ...]], n_neg: int) -> ExactRows:
    if not parts:
        empty = np.zeros(0, np.int64)
        return ExactRows(empty.astype(np.int32), empty, empty, empty, empty.astype(float), n_neg)
    keys, pos, lt, eq, weight = zip(*parts, strict=True)
    return ExactRows(
        keys=np.concatenate(keys, dtype=np.int32),
        pos=np.concatenate(pos, dtype=np.int64),
        neg_lt=np.concatenate(lt, dtype=np.int64),
        neg_eq=np.concatenate(eq, dtype=np.int64),
        weight=np.concatenate(weight, dtype=np.float64),
        n_neg=n_neg,
    )


# ----------------------------------------------------------------------------- torch
def torch_order_keys(x: torch.Tensor) -> torch.Tensor:
    """:func:`order_keys` for a float32 tensor on any device: (M,) int32 tensor."""
    import torch

    bits = x.contiguous().view(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def torch_rows(
    neg_keys: list[torch.Tensor], pos_keys: torch.Tensor, pos_weight: torch.Tensor
) -> ExactRows:
    """The two-level histogram of :func:`bucket_rows` with torch ops on the keys' device.

    Buckets that hold anomalous pixels are numbered 0..G-1; every key of such a bucket goes
    straight to bin ``rank * 65536 + low`` of one histogram (``torch.bincount``), at most
    ``2**26`` bins per pass. Results are moved to the CPU as numpy arrays.

    Args:
        neg_keys: int32 key tensors of the normal pixels (one per update).
        pos_keys: (P,) int32 keys of the anomalous pixels.
        pos_weight: (P,) float64 weight of each anomalous pixel, same device.
    """
    import torch

    device = pos_keys.device
    level1 = torch.zeros(NUM_BUCKETS, dtype=torch.int64, device=device)
    for k in neg_keys:
        level1 += torch.bincount(((k >> 16) + _OFFSET).long(), minlength=NUM_BUCKETS)
    below = torch.cat((level1.new_zeros(1), torch.cumsum(level1, 0)))
    n_neg = int(below[-1])
    pos_buckets = ((pos_keys >> 16) + _OFFSET).long()
    mixed = torch.unique(pos_buckets)  # ascending
    limit = _TORCH_BINS if device.type != "cpu" else _TORCH_BINS_CPU
    per_pass = max(1, limit // NUM_BUCKETS)
    parts: list[tuple[np.ndarray, ...]] = []
    for first in range(0, mixed.numel(), per_pass):
        group = mixed[first : first + per_pass]
        g = group.numel()
        rank = torch.full((NUM_BUCKETS,), -1, dtype=torch.int64, device=device)
        rank[group] = torch.arange(g, device=device)
        bins = g * NUM_BUCKETS

        def bins_of(
            keys: torch.Tensor, rank: torch.Tensor = rank
        ) -> tuple[torch.Tensor, torch.Tensor]:
            r = rank[((keys >> 16) + _OFFSET).long()]
            keep = r >= 0
            return r[keep] * NUM_BUCKETS + (keys[keep] & 0xFFFF).long(), keep

        neg_hist = torch.zeros(bins, dtype=torch.int64, device=device)
        for k in neg_keys:
            idx, _ = bins_of(k)
            neg_hist += torch.bincount(idx, minlength=bins)
        idx, keep = bins_of(pos_keys)
        pos_hist = torch.bincount(idx, minlength=bins)
        pos_sum = torch.bincount(idx, weights=pos_weight[keep], minlength=bins)
        at = torch.nonzero(pos_hist).squeeze(1)
        within = torch.cumsum(neg_hist.view(g, NUM_BUCKETS), 1).view(-1) - neg_hist
        bucket = group[at // NUM_BUCKETS]
        keys = ((bucket - _OFFSET) << 16) | (at % NUM_BUCKETS)
        parts.append(
            tuple(
                t.cpu().numpy()
                for t in (keys, pos_hist[at], within[at] + below[bucket], neg_hist[at], pos_sum[at])
            )
        )
    return _rows(parts, n_neg)
