"""Category-level pixel metrics (AUROC, AP, F1-max, AUPRO) with a streaming accumulator.

All pixels of all test images of one category are pooled into one binary problem (normal
images included). Maps and masks arrive in batches through
:meth:`PixelMetricAccumulator.update`, so a whole benchmark never has to be held as maps.

Modes:
    ``exact``: results are exact, ties included. For float32 maps (and narrower, widened) the
        normal-pixel scores are kept as the low 16 bits of their order-preserving int32 key,
        grouped by the high 16 bits (2 bytes per pixel; see ``_buckets``); ``compute`` builds
        one 65536-bin histogram per bucket that holds anomalous pixels and reads off the exact
        number of normal pixels below and equal to every distinct anomalous score: linear
        time, no sort of the normal pixels, so the speed does not depend on the CPU's sort
        kernel. Maps given as torch tensors on a GPU stay there and get the same two-level
        histogram with torch ops. Float64 maps, and ``exact_method="sort"`` (the reference),
        keep every normal score and sort them once in place, then locate every distinct
        anomalous score with ``searchsorted`` (about 4 or 8 bytes per pixel).
    ``binned``: keeps three histograms on a uniform grid of ``num_bins`` bins: all pixels,
        anomalous pixels, and the sum of ``1/|R_k|`` over anomalous pixels (what AUPRO
        needs, since every region is complete inside one image). Scores in one bin count as
        tied. The grid is taken from ``score_range`` or from the first batch's min/max and
        grows when later scores fall outside, by doubling the bin width and merging pairs of
        bins on an aligned grid, so that histograms stay exactly those of the final grid.
        The observed score range always spans more than ``(num_bins - 1) / 2`` bins.

Regions for AUPRO are the 8-connected components of each image's mask (components of
different images are never merged). Undefined metrics (single class, no region) are NaN
with an :class:`~anomalens.metrics._curves.UndefinedMetricWarning`.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import ndimage

from anomalens.metrics._buckets import (
    BucketStore,
    ExactRows,
    GrowingArray,
    keys_to_float32,
    order_keys,
    remove_sorted,
    torch_order_keys,
    torch_rows,
)
from anomalens.metrics._curves import (
    RankSummary,
    UndefinedMetricWarning,
    ap_from_summary,
    aupro_from_summary,
    auroc_from_summary,
    binning_error_bounds,
    f1max_from_summary,
    summary_from_histograms,
    summary_from_sorted,
    undefined,
)
from anomalens.metrics._kernels import (
    PagedStore,
    available,
    compiled,
    label_masked,
    no_hugepages,
    parallel,
    shares,
    threads,
)
from anomalens.metrics.image import as_labels, as_scores

__all__ = [
    "PixelMetricAccumulator",
    "UndefinedMetricWarning",
    "aupro",
    "label_regions",
    "pixel_metrics",
]

if TYPE_CHECKING:
    import torch

Mode = Literal["exact", "binned"]
AuproVariant = Literal["exact", "cflow200"]
ExactMethod = Literal["bucket", "sort"]
_Engine = Literal["bucket", "sort", "torch"]
# Torch maps on the CPU are handed to the numpy path (faster there); tests set this to run
# the torch path on CPU tensors.
_TORCH_ON_CPU = False

# 8-connectivity inside each image (middle plane), no connection across the batch axis.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True
_FINE_LIMIT = 1 << 62
_CHUNK = 1 << 17  # elements per cache-sized chunk when binning


def _new_store() -> BucketStore | PagedStore:
    """The exact store: compiled paged histograms, or the numpy bucket store without numba."""
    return PagedStore() if available() else BucketStore()


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected components of every mask separately.

    Args:
        masks: (B, H, W) bool ground-truth masks.

    Returns:
        labels (B, H, W) int32 with 0 = background and 1..n the components, numbered
        consecutively over the batch (a component never spans two images), and n.
    """
    masks = as_labels(masks, "masks")
    if masks.ndim != 3:
        raise ValueError(f"masks must be (B, H, W), got shape {masks.shape}")
    labels, n = ndimage.label(masks, structure=_STRUCTURE)
    return labels, int(n)


def _anomalous_pixels(
    maps: np.ndarray | None, masks: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Scores and region sizes of the anomalous pixels, labelling each mask on its bounding box.

    The compiled ``_kernels.label_masked`` gives the same arrays (same numbering) in one
    scan; this scipy version is the reference and the path without numba.

    Args:
        maps: (B, H, W) scores, or None to label only.
        masks: (B, H, W) bool.

    Returns:
        scores (M,) of the anomalous pixels in row-major (B, H, W) order (None without
        ``maps``), their region index (M,) int64 in 0..n-1 (regions numbered over the
        batch, 8-connected, never across images), and sizes (n,) int64.
    """
    scores, regions, sizes = [], [], []
    n = 0
    for i in np.flatnonzero(masks.any(axis=(1, 2))):
        rows = np.flatnonzero(masks[i].any(axis=1))
        cols = np.flatnonzero(masks[i].any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        sub = masks[i][box]
        labels, k = ndimage.label(sub, structure=_STRUCTURE[1])
        lab = labels[sub].astype(np.int64)
        if maps is not None:
            scores.append(maps[i][box][sub])
        regions.append(lab + (n - 1))
        sizes.append(np.bincount(lab, minlength=k + 1)[1:])
        n += int(k)
    out = None
    if maps is not None:
        out = np.concatenate(scores) if scores else np.zeros(0, maps.dtype)
    if not regions:
        return out, np.zeros(0, np.int64), np.zeros(0, np.int64)
    return out, np.concatenate(regions), np.concatenate(sizes)


def _sort_with_ids(values: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort ``values`` ascending and carry ``ids`` along.

    float32 values with ids < 2**32 are packed into one uint64 key (order-preserving bit
    map of the float in the high word) and sorted directly, much faster than an argsort.

    Args:
        values: (M,) float scores (no NaN).
        ids: (M,) non-negative integer ids.

    Returns:
        sorted values (M,) and the ids in the same order (M,) int64.
    """
    if values.dtype == np.float32 and (ids.size == 0 or int(ids.max()) < 2**32):
        bits = values.view(np.uint32).astype(np.uint64)
        negative = bits >= 0x80000000
        bits[negative] ^= 0xFFFFFFFF  # negative floats: reverse their order
        bits[~negative] |= 0x80000000  # non-negative floats above every negative one
        key = (bits << np.uint64(32)) | ids.astype(np.uint64)
        del bits, negative
        key.sort()
        out_ids = (key & np.uint64(0xFFFFFFFF)).astype(np.int64)
        high = (key >> np.uint64(32)).astype(np.uint32)
        del key
        negative = high < 0x80000000
        high[negative] ^= 0xFFFFFFFF
        high[~negative] &= 0x7FFFFFFF
        return high.view(np.float32), out_ids
    order = np.argsort(values, kind="stable")
    return values[order], ids[order].astype(np.int64)


def _min_max(maps: np.ndarray) -> tuple[np.generic, np.generic]:
    """``maps.min(), maps.max()``, the two reductions on two threads (numpy frees the GIL)."""
    if maps.size < 1 << 20:
        return maps.min(), maps.max()
    lo, hi = parallel([maps.min, maps.max])
    return lo, hi


def _is_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch when it is not loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _as_batch(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = as_scores(maps, "maps", check_nan=False)  # NaN is caught by the min/max in update
    masks = as_labels(masks, "masks")
    if maps.ndim == 2:
        maps = maps[None]
    if masks.ndim == 2:
        masks = masks[None]
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(
            f"maps and masks must both be (B, H, W) of the same shape, got {maps.shape} and "
            f"{masks.shape}"
        )
    return maps, masks


class PixelMetricAccumulator:
    """Streaming category-level pixel metrics.

    Example:
        >>> acc = PixelMetricAccumulator(mode="exact")
        >>> for maps, masks in batches:  # (B, H, W) float, (B, H, W) bool
        ...     acc.update(maps, masks)
        >>> acc.compute()  # {"pixel_auroc": ..., "pixel_ap": ..., ...}

    Args:
        mode: ``"exact"`` (exact, ties included) or ``"binned"`` (histograms, bounded
            memory).
        num_bins: grid size of the binned mode (default 2**20).
        score_range: optional ``(lo, hi)`` for the binned grid; scores outside still count
            (the grid grows). Without it the first batch's min/max is used.
        fpr_limit: FPR integration limit of AUPRO (default 0.3).
        aupro_variant: ``"exact"`` (default) or ``"cflow200"`` (200 thresholds uniform in
            score value, FPR < limit kept and min-max rescaled; the MuSc / AnomalyCLIP /
            AdaptCLIP-CPU convention). ``cflow200`` needs ``mode="exact"``.
        exact_method: ``"bucket"`` (default: linear-time two-level histogram of the float32
            order keys, or its torch version for maps on a GPU) or ``"sort"`` (the former
            sort-based path, kept as the reference). Both give identical counts; float64
            maps always use ``"sort"``.
    """

    def __init__(
        self,
        mode: Mode = "exact",
        *,
        num_bins: int = 1 << 20,
        score_range: tuple[float, float] | None = None,
        fpr_limit: float = 0.3,
        aupro_variant: AuproVariant = "exact",
        exact_method: ExactMethod = "bucket",
    ) -> None:
        if mode not in ("exact", "binned"):
            raise ValueError(f"mode must be 'exact' or 'binned', got {mode!r}")
        if aupro_variant not in ("exact", "cflow200"):
            raise ValueError(f"aupro_variant must be 'exact' or 'cflow200', got {aupro_variant!r}")
        if aupro_variant == "cflow200" and mode != "exact":
            raise ValueError(
                "aupro_variant='cflow200' thresholds raw score values: use mode='exact'"
            )
        if exact_method not in ("bucket", "sort"):
            raise ValueError(f"exact_method must be 'bucket' or 'sort', got {exact_method!r}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if int(num_bins) < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        if score_range is not None:
            lo, hi = float(score_range[0]), float(score_range[1])
            if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
                raise ValueError(
                    f"score_range must be finite (lo, hi) with hi > lo, got {score_range}"
                )
        self.mode: Mode = mode
        self.num_bins = int(num_bins)
        self.score_range = score_range
        self.fpr_limit = float(fpr_limit)
        self.aupro_variant: AuproVariant = aupro_variant
        self.exact_method: ExactMethod = exact_method
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every update."""
        self.num_regions = 0
        self.num_pixels = 0
        self._min: np.generic | None = None
        self._max: np.generic | None = None
        # exact mode: the engine is fixed by the first batch (see ``_engine_for``)
        self._engine: _Engine | None = None
        self._neg = GrowingArray()  # "sort": normal scores
        self._neg_sorted = True
        self._buckets = _new_store()  # "bucket": exact counts of all pixels' keys
        self._neg_keys: list[torch.Tensor] = []  # "torch": normal keys on the maps' device
        self._pos: list[Any] = []  # anomalous scores (numpy, or torch on the device)
        self._rows_cache: tuple[int, ExactRows] | None = None
        self._fused_cache: tuple[int, tuple[int, int, float, float, float, int]] | None = None
        self._pos_region: list[np.ndarray] = []
        self._region_size: list[np.ndarray] = []
        # binned mode: grid = fine index floor((x - origin) / width); bin = (fine - F) >> d
        self._grid_dtype = np.dtype(np.float64)
        self._origin: np.floating = np.float64(0.0)
        self._width: np.floating = np.float64(1.0)
        self._offset = 0
        self._shift = 0
        self._grid = False
        self._seen_lo: int | None = None
        self._seen_hi: int | None = None
        self._all_hist = np.zeros(0, dtype=np.int64)
        self._pos_hist = np.zeros(0, dtype=np.int64)
        self._region_hist = np.zeros(0, dtype=np.float64)
        self._pending: tuple[float, int, int, float] | None = None  # constant scores so far
        self._bin_scratch: list[np.ndarray] = []  # per-thread histograms (zero between batches)

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator's arrays."""
        arrays = [self._neg.data, *self._pos_region, *self._region_size]
        arrays += [self._all_hist, self._pos_hist, self._region_hist]
        tensors = [*self._neg_keys, *(self._pos if self._engine == "torch" else [])]
        total = sum(a.nbytes for a in arrays) + sum(t.numel() * t.element_size() for t in tensors)
        if self._engine != "torch":
            total += sum(a.nbytes for a in self._pos)
        return int(total + self._buckets.nbytes)

    # ----------------------------------------------------------------- update
    def update(self, maps: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor) -> None:
        """Add a batch.

        Args:
            maps: (B, H, W) or (H, W) anomaly maps, float (float16 is widened; NaN raises). A
                torch tensor on a GPU stays there in exact mode (float32 or narrower).
            masks: same shape, bool ground truth (numbers ``> 0`` are anomalous).
        """
        if _is_tensor(masks):
            masks = masks.detach().cpu().numpy()
        if _is_tensor(maps):
            if self._wants_torch(maps):
                self._update_torch(maps, masks)
                return
            maps = maps.detach()
            maps = (maps.float() if maps.dtype.itemsize < 4 else maps).cpu().numpy()
        elif self._engine == "torch":
            self._update_torch(maps, masks)
            return
        maps, masks = _as_batch(maps, masks)
        if maps.size == 0:
            return
        lo, hi = _min_max(maps)
        if np.isnan(lo) or np.isnan(hi):
            raise ValueError("maps contain NaN; replace them before computing metrics")
        self._min = lo if self._min is None else min(self._min, lo)
        self._max = hi if self._max is None else max(self._max, hi)
        flat = maps.reshape(-1)
        mflat = masks.reshape(-1)
        if available():
            maps, masks = np.ascontiguousarray(maps), np.ascontiguousarray(masks)
            with no_hugepages():
                pos_scores, pos_region, sizes = label_masked(maps, masks)
        else:
            pos_scores, pos_region, sizes = _anomalous_pixels(maps, masks)
        assert pos_scores is not None
        if self.mode == "exact":
            self._set_engine("bucket" if self._bucket_dtype(maps.dtype) else "sort")
            if self._engine == "bucket":  # all pixels; compute subtracts the anomalous ones
                if isinstance(self._buckets, PagedStore) and self._paged(maps.dtype):
                    self._buckets.add_scores(flat)  # the keys are made on the fly
                else:
                    self._buckets.add(flat.view(np.int32) if lo > 0 else order_keys(flat))
            else:
                self._neg.append(flat[~mflat] if pos_scores.size else flat)
                self._neg_sorted = False
            if sizes.size:
                self._add_regions(pos_region, sizes)
                self._pos.append(pos_scores)
        else:
            pos_w = 1.0 / sizes.astype(np.float64)
            self._update_binned(flat, pos_scores, pos_w[pos_region], float(lo), float(hi))
        self.num_regions += int(sizes.size)
        self.num_pixels += flat.size

    def _paged(self, dtype: np.dtype) -> bool:
        """Whether this batch goes to the compiled store (exact bucket engine, float32)."""
        return (
            self.mode == "exact"
            and self._bucket_dtype(dtype)
            and self._engine in (None, "bucket")
            and isinstance(self._buckets, PagedStore)
        )

    def _bucket_dtype(self, dtype: np.dtype) -> bool:
        return self.exact_method == "bucket" and dtype == np.float32

    def _wants_torch(self, maps: torch.Tensor) -> bool:
        """Exact mode keeps float32 (or narrower) tensors on their GPU."""
        if self._engine == "torch":
            return True
        if self._engine is not None or self.mode != "exact" or self.exact_method != "bucket":
            return False
        if not maps.is_floating_point() or maps.dtype.itemsize > 4:
            return False
        return maps.device.type != "cpu" or _TORCH_ON_CPU

    def _set_engine(self, engine: _Engine) -> None:
        """Fix the exact engine at the first batch; a float64 batch widens "bucket" to "sort"."""
        if self._engine is None:
            self._engine = engine
        elif self._engine == "bucket" and engine == "sort":
            pos = np.sort(order_keys(np.concatenate(self._pos))) if self._pos else []
            self._neg.append(keys_to_float32(remove_sorted(self._buckets.keys(), pos)))
            self._buckets = _new_store()
            self._neg_sorted = False
            self._engine = "sort"

    def _add_regions(self, pos_region: np.ndarray, sizes: np.ndarray) -> None:
        wide = self.num_regions + sizes.size >= 2**31
        ids = (pos_region.astype(np.int64) if wide else pos_region) + self.num_regions
        self._pos_region.append(ids.astype(np.int32 if ids.max() < 2**31 else np.int64))
        self._region_size.append(sizes)

    def _update_torch(self, maps: Any, masks: np.ndarray) -> None:
        """Exact mode for float32 tensors: keys stay on the maps' device."""
        import torch

        device = self._neg_keys[0].device if self._neg_keys else None
        if not _is_tensor(maps):
            arr = as_scores(maps, "maps", check_nan=False)
            if arr.dtype != np.float32:
                raise ValueError(
                    f"this accumulator keeps float32 torch maps on {device}; got numpy maps of "
                    f"dtype {arr.dtype}"
                )
            maps = torch.from_numpy(arr)
        maps = maps.detach()
        if not maps.is_floating_point() or maps.dtype.itemsize > 4:
            raise ValueError(
                f"this accumulator keeps float32 torch maps on {device}; got dtype {maps.dtype}"
            )
        maps = maps.to(device=device, dtype=torch.float32) if device else maps.float()
        masks = as_labels(masks, "masks")
        if maps.ndim == 2:
            maps = maps[None]
        if masks.ndim == 2:
            masks = masks[None]
        if maps.ndim != 3 or tuple(maps.shape) != masks.shape:
            raise ValueError(
                f"maps and masks must both be (B, H, W) of the same shape, got "
                f"{tuple(maps.shape)} and {masks.shape}"
            )
        if maps.numel() == 0:
            return
        lo_t, hi_t = torch.aminmax(maps)
        lo, hi = np.float32(lo_t.item()), np.float32(hi_t.item())
        if np.isnan(lo) or np.isnan(hi):
            raise ValueError("maps contain NaN; replace them before computing metrics")
        self._engine = "torch"
        self._min = lo if self._min is None else min(self._min, lo)
        self._max = hi if self._max is None else max(self._max, hi)
        _, pos_region, sizes = _anomalous_pixels(None, masks)
        flat = maps.reshape(-1)
        if sizes.size:
            mask_t = torch.from_numpy(masks.reshape(-1)).to(maps.device)
            self._neg_keys.append(torch_order_keys(flat[~mask_t]))
            self._pos.append(flat[mask_t])
            self._add_regions(pos_region, sizes)
        else:
            self._neg_keys.append(torch_order_keys(flat))
        self.num_regions += int(sizes.size)
        self.num_pixels += flat.numel()

    def _update_binned(
        self, flat: np.ndarray, pos_scores: np.ndarray, pos_w: np.ndarray, lo: float, hi: float
    ) -> None:
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(
                "binned mode needs finite scores; use mode='exact' for infinite scores"
            )
        if not self._grid and self.score_range is not None:
            self._init_grid(float(self.score_range[0]), float(self.score_range[1]), flat.dtype)
        if not self._grid:
            if self._pending is not None:
                lo, hi = min(lo, self._pending[0]), max(hi, self._pending[0])
            if lo == hi:  # still a single score value: keep plain counts until a range appears
                prev = self._pending or (lo, 0, 0, 0.0)
                n_pos = pos_scores.size
                self._pending = (
                    lo,
                    prev[1] + flat.size - n_pos,
                    prev[2] + n_pos,
                    prev[3] + float(pos_w.sum()),
                )
                return
            self._init_grid(lo, hi, flat.dtype)
            if self._pending is not None:
                value, n_neg, n_pos, w = self._pending
                self._pending = None
                f = self._fine(np.array([value]), check=True)
                self._cover(int(f[0]), int(f[0]))
                b = int(self._bins(f)[0])
                self._all_hist[b] += n_neg + n_pos
                self._pos_hist[b] += n_pos
                self._region_hist[b] += w
        f_lo, f_hi = (int(v) for v in self._fine(np.array([lo, hi]), check=True))
        self._cover(f_lo, f_hi)
        nb = self.num_bins
        if not self._bin_compiled(flat):
            self._all_hist += np.bincount(self._fine(flat, to_bins=True), minlength=nb)
        if pos_scores.size:
            pos_bins = self._fine(pos_scores, to_bins=True)
            self._pos_hist += np.bincount(pos_bins, minlength=nb)
            self._region_hist += np.bincount(pos_bins, weights=pos_w, minlength=nb)

    def _bin_compiled(self, flat: np.ndarray) -> bool:
        """Count ``flat`` into ``_all_hist`` with the compiled kernel, on the threads.

        The same bins as ``bincount(_fine(flat, to_bins=True))`` (same float operations, in
        the grid's dtype), about 4x faster. Returns False (nothing counted) without numba or
        when the batch's dtype is not the grid's.
        """
        kernels = compiled()
        if kernels is None or flat.dtype != self._grid_dtype:
            return False
        flat = np.ascontiguousarray(flat)
        nb = self.num_bins
        workers = threads() if flat.size >= 4 * nb else 1  # each extra thread adds a histogram
        if len(self._bin_scratch) != workers - 1:
            self._bin_scratch = [np.zeros(nb, dtype=np.int64) for _ in range(workers - 1)]
        hists = [self._all_hist, *self._bin_scratch]
        grid = (self._origin, self._width, self._offset, self._shift)
        parallel(
            [
                functools.partial(kernels.bin_counts, flat, a, b, *grid, hists[t])
                for t, (a, b) in enumerate(shares(flat.size, workers))
            ]
        )
        for extra in self._bin_scratch:
            self._all_hist += extra
            extra.fill(0)
        return True

    def _init_grid(self, lo: float, hi: float, data_dtype: np.dtype) -> None:
        """Fix the grid: bins of width (hi - lo) / (num_bins - 1) from lo.

        Bin indices are computed in float32 for float32 maps (twice as fast; still monotone,
        and the float32 rounding of a bin edge is far below the bin width) else in float64.
        """
        nb = self.num_bins
        width = (hi - lo) / (nb - 1)  # lo -> bin 0, hi -> bin nb - 1 (up to one ulp)
        if not (np.isfinite(width) and width > 0.0):
            raise ValueError(f"cannot build a binned grid over the score range [{lo}, {hi}]")
        dtype = np.dtype(np.float32 if data_dtype == np.float32 else np.float64)
        if dtype == np.float32 and not (
            np.float32(width) > np.finfo(np.float32).tiny and np.isfinite(np.float32(lo))
        ):
            dtype = np.dtype(np.float64)
        self._grid_dtype = dtype
        self._origin, self._width = dtype.type(lo), dtype.type(width)
        self._offset, self._shift = 0, 0
        self._seen_lo, self._seen_hi = None, None
        self._grid = True
        self._all_hist = np.zeros(nb, dtype=np.int64)
        self._pos_hist = np.zeros(nb, dtype=np.int64)
        self._region_hist = np.zeros(nb, dtype=np.float64)

    def _fine(self, x: np.ndarray, check: bool = False, to_bins: bool = False) -> np.ndarray:
        """Fine grid index ``floor((x - origin) / width)`` (monotone in x), (M,) intp.

        Computed in float64 over cache-sized chunks. ``check`` guards against indices that
        would overflow (callers check the batch min/max; monotonicity covers the rest);
        ``to_bins`` returns the current bins ``(fine - offset) >> shift`` instead.
        """
        x = np.asarray(x).reshape(-1)
        out = np.empty(x.size, dtype=np.intp)
        step = max(1, min(x.size, _CHUNK))
        dtype = self._grid_dtype
        buf = np.empty(step, dtype=dtype)
        for start in range(0, x.size, step):
            t = buf[: min(step, x.size - start)]
            chunk = x[start : start + t.size]
            np.subtract(chunk, self._origin, out=t, dtype=dtype, casting="same_kind")
            t /= self._width
            np.floor(t, out=t)
            if check and (t.min() <= -_FINE_LIMIT or t.max() >= _FINE_LIMIT):
                raise ValueError(
                    "scores span too many orders of magnitude for the binned grid; pass "
                    "score_range=(lo, hi) or use mode='exact'"
                )
            o = out[start : start + t.size]
            np.copyto(o, t, casting="unsafe")
            if to_bins:
                self._bins(o)
        return out

    def _bins(self, fine: np.ndarray) -> np.ndarray:
        """Current bin of fine indices (in place): ``(fine - offset) >> shift``."""
        fine -= self._offset
        fine >>= self._shift
        return fine

    def _cover(self, f_lo: int, f_hi: int) -> None:
        """Grow the grid (aligned doubling) until fine indices [f_lo, f_hi] are covered."""
        nb = self.num_bins
        lo = f_lo if self._seen_lo is None else min(f_lo, self._seen_lo)
        hi = f_hi if self._seen_hi is None else max(f_hi, self._seen_hi)
        self._seen_lo, self._seen_hi = lo, hi
        offset, shift = self._offset, self._shift
        if lo >= offset and hi < offset + (nb << shift):
            return
        new_shift = shift + 1
        while True:
            slack = (nb << new_shift) - (hi - lo + 1)
            if slack >= 0:
                start = lo - slack // 2
                new_offset = offset + (((start - offset) >> shift) << shift)
                if new_offset <= lo and hi < new_offset + (nb << new_shift):
                    break
            new_shift += 1
        old_bins = np.arange(nb, dtype=np.int64)
        target = ((old_bins << shift) + (offset - new_offset)) >> new_shift
        self._all_hist = np.rint(np.bincount(target, weights=self._all_hist, minlength=nb)).astype(
            np.int64
        )
        self._pos_hist = np.rint(np.bincount(target, weights=self._pos_hist, minlength=nb)).astype(
            np.int64
        )
        self._region_hist = np.bincount(target, weights=self._region_hist, minlength=nb)
        self._offset, self._shift = new_offset, new_shift

    # ---------------------------------------------------------------- compute
    def _consolidate(self) -> None:
        """Exact mode: one sorted normal-score array, one anomalous array (in place)."""
        dtype = np.result_type(self._neg.data.dtype, *(a.dtype for a in self._pos))
        self._neg.astype(dtype)
        if not self._neg_sorted:
            self._neg.trim()
            self._neg.view().sort()  # in place: no second copy of the largest array
            self._neg_sorted = True
        for name in ("_pos", "_pos_region", "_region_size"):
            chunks = getattr(self, name)
            if len(chunks) > 1:
                setattr(self, name, [np.concatenate(chunks)])
        if self._pos and self._pos[0].dtype != dtype:
            self._pos = [self._pos[0].astype(dtype)]

    def _exact_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Sort engine: sorted negatives, distinct anomalous values (asc), counts, 1/|R| sums."""
        self._consolidate()
        neg = self._neg.view()
        if not self._pos:
            empty = np.zeros(0, dtype=neg.dtype)
            return neg, empty, np.zeros(0, np.int64), np.zeros(0, np.float64)
        pos_sorted, region = _sort_with_ids(self._pos[0], self._pos_region[0])
        inv_size = 1.0 / self._region_size[0].astype(np.float64)
        weight = inv_size[region]
        del region
        starts = np.flatnonzero(np.concatenate(([True], pos_sorted[1:] != pos_sorted[:-1])))
        values = pos_sorted[starts]
        counts = np.diff(np.append(starts, pos_sorted.size))
        weight_sum = np.add.reduceat(weight, starts)
        return neg, values, counts, weight_sum

    def _regions(self) -> tuple[np.ndarray, np.ndarray]:
        """1/|R| of every region (n,) and the region of every anomalous pixel (P,)."""
        for name in ("_pos_region", "_region_size"):
            chunks = getattr(self, name)
            if len(chunks) > 1:
                setattr(self, name, [np.concatenate(chunks)])
        inv_size = 1.0 / np.concatenate([np.zeros(0), *self._region_size])
        region = self._pos_region[0] if self._pos_region else np.zeros(0, np.int64)
        return inv_size, region

    def _anomalous(self) -> tuple[np.ndarray, np.ndarray]:
        """Bucket engine: keys (P,) int32 of the anomalous pixels and their weights 1/|R|."""
        if len(self._pos) > 1:
            self._pos = [np.concatenate(self._pos)]
        inv_size, region = self._regions()
        pos = self._pos[0] if self._pos else np.zeros(0, np.float32)
        return order_keys(pos), inv_size[region]

    def _exact_rows(self) -> ExactRows:
        """Bucket and torch engines: exact counts at every distinct anomalous score (cached)."""
        if self._rows_cache is not None and self._rows_cache[0] == self.num_pixels:
            return self._rows_cache[1]
        if self._engine == "torch":
            import torch

            inv_size, region = self._regions()
            device = self._neg_keys[0].device
            pos = torch.cat(self._pos) if self._pos else torch.zeros(0, device=device)
            self._pos = [pos] if self._pos else []
            index = torch.from_numpy(region.astype(np.int64)).to(device)
            weight = torch.from_numpy(inv_size).to(device)[index]
            rows = torch_rows(self._neg_keys, torch_order_keys(pos), weight)
        else:
            with no_hugepages():
                rows = self._buckets.rows(*self._anomalous())
        self._rows_cache = (self.num_pixels, rows)
        return rows

    def summary(self) -> RankSummary:
        """Tie-aware rank summary of everything seen so far (see ``_curves.RankSummary``)."""
        if self.mode == "exact" and self._engine in ("bucket", "torch"):
            r = self._exact_rows()
            n = r.n_neg
            neg_ge = n - r.neg_lt
            return RankSummary(  # descending views, no copies
                pos=r.pos[::-1],
                neg_ge=neg_ge[::-1],
                neg_gt=(neg_ge - r.neg_eq)[::-1],
                n_pos=int(r.pos.sum()),
                n_neg=n,
                region_weight=r.weight[::-1],
                n_regions=self.num_regions,
            )
        if self.mode == "exact":
            neg, values, counts, weight_sum = self._exact_parts()
            return summary_from_sorted(neg, values, counts, weight_sum, self.num_regions)
        if not self._grid:
            _, n_neg, n_pos, w = self._pending or (0.0, 0, 0, 0.0)
            return summary_from_histograms(
                np.array([n_neg]), np.array([n_pos]), np.array([w]), self.num_regions
            )
        return summary_from_histograms(
            self._all_hist - self._pos_hist, self._pos_hist, self._region_hist, self.num_regions
        )

    def _negatives_le(self, thresholds: np.ndarray) -> tuple[np.ndarray, int]:
        """Normal pixels ``<=`` each of (T,) ascending ``thresholds``: (T,) int64, and N."""
        if self._engine == "bucket":  # all pixels minus the anomalous ones
            keys = order_keys(thresholds.astype(np.float32))
            rows = self._exact_rows()
            pos_le = np.concatenate(([0], np.cumsum(rows.pos)))
            pos_le = pos_le[np.searchsorted(rows.keys, keys, side="right")]
            return self._buckets.count_le(keys) - pos_le, rows.n_neg
        if self._engine == "torch":
            import torch

            device = self._neg_keys[0].device
            keys = torch.from_numpy(order_keys(thresholds.astype(np.float32))).to(device)
            hist = torch.zeros(keys.numel() + 1, dtype=torch.int64, device=device)
            for k in self._neg_keys:  # k <= t_i  iff  i >= #(thresholds below k)
                hist += torch.bincount(torch.searchsorted(keys, k), minlength=keys.numel() + 1)
            le = torch.cumsum(hist, 0)[:-1].cpu().numpy()
            return le, int(hist.sum())
        self._consolidate()
        neg = self._neg.view()
        return np.searchsorted(neg, thresholds, side="right"), neg.size

    def error_bounds(self) -> dict[str, float]:
        """Guaranteed bounds on |binned - exact| per pixel metric (zeros in exact mode).

        Computed from the histograms alone (see ``_curves.binning_error_bounds``); the
        AUPRO bound is for ``aupro_variant="exact"``.
        """
        if self.mode == "exact":
            return dict.fromkeys(("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"), 0.0)
        return binning_error_bounds(self.summary(), self.fpr_limit)

    def _aupro_cflow200(self, steps: int = 200) -> float:
        if self._engine in ("bucket", "torch"):
            rows = self._exact_rows()
            values, weight_sum, n_neg = keys_to_float32(rows.keys), rows.weight, rows.n_neg
        else:
            neg, values, _, weight_sum = self._exact_parts()
            n_neg = neg.size
        if self.num_regions == 0:
            return undefined("pixel AUPRO (cflow200)", "no anomalous region in the masks")
        if n_neg == 0:
            return undefined("pixel AUPRO (cflow200)", "no normal pixel")
        lo, hi = self._min, self._max
        delta = (hi - lo) / steps
        if not delta > 0:
            return undefined("pixel AUPRO (cflow200)", "all map values are equal")
        thresholds = np.arange(lo, hi, delta)
        neg_le, n_neg = self._negatives_le(thresholds)
        fpr = (n_neg - neg_le) / n_neg
        weight_above = np.append(np.cumsum(weight_sum[::-1])[::-1], 0.0)
        pro = weight_above[np.searchsorted(values, thresholds, side="right")] / self.num_regions
        keep = fpr < self.fpr_limit
        fpr, pro = fpr[keep][::-1], pro[keep][::-1]  # ascending FPR
        if fpr.size < 2 or fpr[-1] == fpr[0]:
            return undefined(
                "pixel AUPRO (cflow200)", "fewer than two distinct FPRs below the limit"
            )
        fpr = (fpr - fpr[0]) / (fpr[-1] - fpr[0])
        return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0)

    def aupro(self) -> float:
        """AUPRO of everything seen so far, in the configured variant."""
        if self.aupro_variant == "cflow200":
            return self._aupro_cflow200()
        return aupro_from_summary(self.summary(), self.fpr_limit, "pixel AUPRO")

    def compute(self) -> dict[str, float]:
        """Return ``pixel_auroc``, ``pixel_ap``, ``pixel_f1max`` and ``pixel_aupro``."""
        kernels = compiled()
        if self.mode == "exact" and self._engine in ("bucket", "torch") and kernels is not None:
            return self._compute_fused(kernels)
        s = self.summary()
        if self.aupro_variant == "cflow200":
            pro = self._aupro_cflow200()
        else:
            pro = aupro_from_summary(s, self.fpr_limit, "pixel AUPRO")
        return {
            "pixel_auroc": auroc_from_summary(s, "pixel AUROC"),
            "pixel_ap": ap_from_summary(s, "pixel AP"),
            "pixel_f1max": f1max_from_summary(s, "pixel F1-max"),
            "pixel_aupro": pro,
        }

    def _fused(self, kernels: Any) -> tuple[int, int, float, float, float, int]:
        """2U, P, AP, F1-max, AUPRO area and N in one compiled pass (cached).

        The paged store walks its buckets without storing the rows; otherwise (torch
        engine, numpy store) the cached exact rows are walked.
        """
        cached = self._fused_cache
        if cached is not None and cached[0] == self.num_pixels:
            return cached[1]
        store = self._buckets
        if self._engine == "bucket" and isinstance(store, PagedStore):
            with no_hugepages():
                keys, weight = self._anomalous()
                out = store.metrics(keys, weight, self.num_regions, self.fpr_limit)
        else:
            r = self._exact_rows()
            twice_u, n_pos, ap, f1, area = kernels.metrics(
                r.pos, r.neg_lt, r.neg_eq, r.weight, r.n_neg, self.num_regions, self.fpr_limit
            )
            out = (int(twice_u), int(n_pos), float(ap), float(f1), float(area), r.n_neg)
        self._fused_cache = (self.num_pixels, out)
        return out

    def _compute_fused(self, kernels: Any) -> dict[str, float]:
        """The four metrics in one compiled pass (same definitions as ``_curves``)."""
        twice_u, n_pos, ap, f1, area, n_neg = self._fused(kernels)
        reason = None  # as _curves' single-class checks
        if n_pos == 0 and n_neg == 0:
            reason = "no samples"
        elif n_pos == 0:
            reason = "no positive (anomalous) sample"
        elif n_neg == 0:
            reason = "no negative (normal) sample"
        out = {
            "pixel_auroc": int(twice_u) / (2.0 * n_pos * n_neg) if reason is None else None,
            "pixel_ap": float(ap) if reason is None else None,
            "pixel_f1max": float(f1) if reason is None else None,
        }
        names = {
            "pixel_auroc": "pixel AUROC",
            "pixel_ap": "pixel AP",
            "pixel_f1max": "pixel F1-max",
        }
        result = {k: undefined(names[k], reason) if v is None else v for k, v in out.items()}
        if self.aupro_variant == "cflow200":
            result["pixel_aupro"] = self._aupro_cflow200()
        elif self.num_regions == 0:
            result["pixel_aupro"] = undefined(
                "pixel AUPRO", "no anomalous region in the ground-truth masks"
            )
        elif n_neg == 0:
            result["pixel_aupro"] = undefined("pixel AUPRO", "no normal pixel")
        else:
            result["pixel_aupro"] = float(area) / self.fpr_limit
        return result


def pixel_metrics(
    maps: np.ndarray,
    masks: np.ndarray,
    mode: Mode = "exact",
    **kwargs: object,
) -> dict[str, float]:
    """One-shot pixel metrics of one category.

    Args:
        maps: (N, H, W) anomaly maps of all test images of the category.
        masks: (N, H, W) bool ground truth.
        mode: ``"exact"`` or ``"binned"``.
        **kwargs: further :class:`PixelMetricAccumulator` options.

    Returns:
        ``pixel_auroc``, ``pixel_ap``, ``pixel_f1max``, ``pixel_aupro``.
    """
    acc = PixelMetricAccumulator(mode, **kwargs)
    acc.update(maps, masks)
    return acc.compute()


def aupro(
    maps: np.ndarray,
    masks: np.ndarray,
    fpr_limit: float = 0.3,
    variant: AuproVariant = "exact",
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    Args:
        maps: (N, H, W) anomaly maps.
        masks: (N, H, W) bool ground truth; regions are 8-connected components per image.
        fpr_limit: FPR integration limit (default 0.3).
        variant: ``"exact"`` (every distinct threshold, interpolated at the limit, divided
            by it) or ``"cflow200"`` (legacy 200-threshold variant).
    """
    acc = PixelMetricAccumulator("exact", fpr_limit=fpr_limit, aupro_variant=variant)
    acc.update(maps, masks)
    return acc.aupro()
