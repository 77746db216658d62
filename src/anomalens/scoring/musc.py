"""MuSc scoring stages as pure tensor functions: LNAMD, MSM (mutual scoring), fusion, RsCIN.

MuSc (Li et al., ICLR 2024) scores a *batch* of unlabeled test images against each other:

1. :func:`lnamd` aggregates the patch tokens of one layer over r x r neighbourhoods
   (LayerNorm over the whole (C, h, w) map, zero-padded r x r mean, L2 normalisation).
2. :func:`mutual_scores` gives every patch of image i the mean of the smallest (default 30 %)
   of its nearest-neighbour distances to each other image j != i. It streams over blocks of
   query and reference images, so memory is bounded by the block sizes, and the result equals
   the single-block computation. :class:`MutualScoreBlocks` gives the same scores when the
   reference images arrive in separate blocks (e.g. shards on other machines): it keeps only
   the smallest distances per patch (:func:`merge_smallest`) and checks that every image of
   the batch was counted exactly once.
3. :func:`fuse_scores` averages the (layer, r) score maps (float64), :func:`upsample_maps`
   resizes them bilinearly (``align_corners=True``), :func:`max_scores` takes the image score.
4. :func:`rscin` re-scores the image scores with a similarity graph over global embeddings.

:func:`divide_subsets` splits a big category into stratified subsets that are scored
separately (the official ``divide_num``); RsCIN then runs once on the whole category.

Every function is device-agnostic; shapes are given in the docstrings.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from anomalens.scoring.maps import upsample

__all__ = [
    "MIN_IMAGES_FOR_DEFAULT_INTERVAL",
    "UNIT_NORM_TOLERANCE",
    "MutualScoreBlocks",
    "check_unit_norm",
    "divide_subsets",
    "fuse_scores",
    "interval_bounds",
    "lnamd",
    "max_scores",
    "merge_smallest",
    "minmax_normalize",
    "mutual_scores",
    "nn_distances",
    "rscin",
    "upsample_maps",
]

#: Smallest batch for which the default interval [0, 0.3) of the N-1 distances is non-empty
#: (floor(0.3 * 4) = 1). Smaller batches use the guard documented in :func:`interval_bounds`.
MIN_IMAGES_FOR_DEFAULT_INTERVAL = 5


# --------------------------------------------------------------------------------- LNAMD
def lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int, eps: float = 1e-5) -> torch.Tensor:
    """Local Neighbourhood Aggregation with one degree ``r`` (MuSc LNAMD).

    Per image: LayerNorm over the whole (C, h, w) map (one mean / variance per image, no
    affine), per-channel mean over the r x r neighbourhood with zero padding counted in the
    divisor (identity for r = 1), then L2 normalisation of every position.

    Args:
        tokens: (B, L, C) patch tokens without class token, L = h * w in row-major order.
        grid: (h, w) patch grid.
        r: odd neighbourhood size >= 1.
        eps: LayerNorm epsilon.

    Returns:
        (B, L, C) unit vectors (same dtype as ``tokens``).
    """
    return _l2_normalize(lnamd_unnormalized(tokens, grid, r, eps))


def lnamd_unnormalized(
    tokens: torch.Tensor, grid: tuple[int, int], r: int, eps: float = 1e-5
) -> torch.Tensor:
    """LNAMD before the final L2 normalisation (see :func:`lnamd`).

    Returns:
        (B, L, C) aggregated features.
    """
    if r < 1 or r % 2 == 0:
        raise ValueError(f"LNAMD degree r must be an odd integer >= 1, got r={r}")
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, L, C), got shape {tuple(tokens.shape)}")
    b, n, c = tokens.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {grid} has {h * w} positions but tokens have L={n}")
    x = tokens.transpose(1, 2).reshape(b, c, h, w)
    x = F.layer_norm(x, (c, h, w), eps=eps)
    if r > 1:
        x = F.avg_pool2d(x, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    return x.reshape(b, c, n).transpose(1, 2)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------------------------- MSM
def interval_bounds(
    num_others: int, topmin_min: float = 0.0, topmin_max: float = 0.3
) -> tuple[int, int]:
    """Rank interval [lo, hi) of the sorted per-image NN distances that MSM averages.

    Fractions (< 1) are taken of ``num_others`` = N - 1 and floored, values >= 1 are counts
    (as the official code). **Small-batch guard** (differs from the official code, which
    returns an empty interval and NaN scores for N < 5): the interval is clamped to hold at
    least one rank, ``hi = max(hi, lo + 1)``, inside ``[0, num_others)``. So N = 2..4 images
    with the defaults average the smallest distance only.

    Args:
        num_others: N - 1 >= 1, the number of other images each image is compared with.
        topmin_min: lower bound (fraction or count).
        topmin_max: upper bound (fraction or count), > topmin_min.

    Returns:
        (lo, hi) with 0 <= lo < hi <= num_others.
    """
    if num_others < 1:
        raise ValueError(
            "MuSc mutual scoring needs at least 2 images (each image is scored against the "
            f"others), got {num_others + 1}"
        )
    if not 0 <= topmin_min < topmin_max:
        raise ValueError(f"need 0 <= topmin_min < topmin_max, got {topmin_min}, {topmin_max}")

    def to_rank(v: float) -> int:
        return math.floor(v * num_others) if v < 1 else int(v)

    lo = min(to_rank(topmin_min), num_others - 1)
    hi = min(max(to_rank(topmin_max), lo + 1), num_others)
    return lo, hi


#: Largest deviation of a feature's norm from 1 accepted by the half-precision MSM path
#: (bfloat16 storage of unit vectors alone moves norms by ~2e-3).
UNIT_NORM_TOLERANCE = 1e-2


#: Largest number of gathered feature values held at once by the half-precision search.
_GATHER_ELEMENTS = 1 << 25


def nn_distances(
    queries: torch.Tensor, references: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Euclidean distance of every query patch to its nearest patch in each reference image.

    ``compute_dtype`` None or float32: ``torch.cdist`` (matrix-product formula in float32, as
    the official code). float16 / bfloat16: the features must be unit vectors (LNAMD output);
    the nearest neighbour is searched as the largest dot product computed in that dtype
    (tensor cores on GPU, AVX512-BF16 on CPU) and its distance is recomputed in float32. Not
    bit-faithful: where two candidates are closer than the half-precision rounding, a
    slightly farther one may be taken.

    Args:
        queries: (Q, L, C) patch features of Q query images.
        references: (R, M, C) patch features of R reference images.
        compute_dtype: dtype of the distance products (see above).

    Returns:
        (Q, L, R) float32: ``out[i, p, j] = min_q || queries[i, p] - references[j, q] ||``.
    """
    q, n, c = queries.shape
    r, m, _ = references.shape
    if compute_dtype is None or compute_dtype == torch.float32:
        d = torch.cdist(queries.reshape(q * n, c).float(), references.reshape(r * m, c).float())
        return d.view(q * n, r, m).amin(dim=2).view(q, n, r)
    # search in half precision, measure in float32: the nearest neighbour is the largest dot
    # product (unit vectors), found with half-precision products; its distance is then
    # recomputed exactly. (sqrt(2 - 2 * dot) from a bfloat16 dot moved MSM maps by up to 0.04
    # on near-duplicate patches, where MSM's small distances matter most.)
    a = queries.reshape(q * n, c)
    nearest = a.to(compute_dtype) @ references.reshape(r * m, c).to(compute_dtype).T
    nearest = nearest.view(q * n, r, m).argmax(dim=2)  # (Q * L, R)
    a32 = a.float()[:, None, :]
    flat = references.reshape(r * m, c)
    nearest += torch.arange(r, device=nearest.device) * m  # rows of ``flat``
    out = torch.empty(q * n, r, dtype=torch.float32, device=queries.device)
    step = max(1, _GATHER_ELEMENTS // max(1, q * n * c))  # reference images per gather
    for j in range(0, r, step):
        picked = flat[nearest[:, j : j + step]].float()  # (Q * L, step, C)
        out[:, j : j + step] = (a32 - picked).norm(dim=-1)
    return out.view(q, n, r)


def check_unit_norm(features: torch.Tensor) -> None:
    """Refuse features whose norms are off 1 by more than :data:`UNIT_NORM_TOLERANCE`.

    The half-precision neighbour search of :func:`nn_distances` needs unit vectors.

    Args:
        features: (..., C) features.
    """
    dev = (features.float().norm(dim=-1) - 1).abs().max().item()
    if dev > UNIT_NORM_TOLERANCE:
        raise ValueError(
            f"half-precision MSM needs unit-norm features (LNAMD output); a norm is off by "
            f"{dev:.3g}"
        )


def mutual_scores(
    features: torch.Tensor,
    topmin_min: float = 0.0,
    topmin_max: float = 0.3,
    query_chunk: int | None = None,
    ref_chunk: int | None = None,
    compute_dtype: torch.dtype | None = None,
    on_block: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """MuSc Mutual Scoring Mechanism (MSM) for one (layer, r) feature set.

    Every patch p of image i gets the mean of the ranks [lo, hi) (see :func:`interval_bounds`)
    of the sorted distances ``{ min_q ||Z[i, p] - Z[j, q]|| : j != i }``.

    Streaming: query images are processed in blocks of ``query_chunk`` and compared with
    reference blocks of ``ref_chunk`` images; only a (query_chunk, L, N) matrix of NN
    distances and one (query_chunk * L, ref_chunk * L) distance block are alive at a time.
    Block sizes change only the batching of ``cdist``, not the values reduced (equal to the
    unchunked result up to matrix-product rounding, ~1e-7).

    Args:
        features: (N, L, C) features, N >= 2 (unit vectors from :func:`lnamd`), any float
            dtype (blocks are cast to the compute dtype).
        topmin_min: lower bound of the averaged interval (fraction of N - 1 or count).
        topmin_max: upper bound of the averaged interval (fraction of N - 1 or count).
        query_chunk: query images per block (None: all N).
        ref_chunk: reference images per block (None: all N).
        compute_dtype: distance products in float32 (None, official) or float16 / bfloat16
            (unit vectors required, checked; see :func:`nn_distances`).
        on_block: called with the number of query images after each query block (progress).

    Returns:
        (N, L) float32 patch scores (on the device of ``features``).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (N, L, C), got shape {tuple(features.shape)}")
    n, length, _ = features.shape
    lo, hi = interval_bounds(n - 1, topmin_min, topmin_max)
    qc = n if query_chunk is None else int(query_chunk)
    rc = n if ref_chunk is None else int(ref_chunk)
    if qc < 1 or rc < 1:
        raise ValueError(f"chunk sizes must be >= 1, got query_chunk={qc}, ref_chunk={rc}")
    half = compute_dtype is not None and compute_dtype != torch.float32
    out = torch.empty(n, length, dtype=torch.float32, device=features.device)
    for q0 in range(0, n, qc):
        q1 = min(q0 + qc, n)
        if half:  # every image is a query once: this checks all of them, O(N L C) in total
            check_unit_norm(features[q0:q1])
        dist = torch.empty(q1 - q0, length, n, dtype=torch.float32, device=features.device)
        for r0 in range(0, n, rc):
            r1 = min(r0 + rc, n)
            dist[:, :, r0:r1] = nn_distances(features[q0:q1], features[r0:r1], compute_dtype)
        own = torch.arange(q0, q1, device=features.device)
        dist[torch.arange(q1 - q0, device=features.device), :, own] = float("inf")
        smallest = torch.topk(dist, hi, dim=2, largest=False, sorted=True).values
        out[q0:q1] = smallest[:, :, lo:hi].mean(dim=2)
        if on_block is not None:
            on_block(q1 - q0)
    return out


def merge_smallest(kept: torch.Tensor | None, block: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest values of ``kept`` and ``block`` together, along the last axis.

    Exact: the k smallest of a union are the k smallest of the union of each part's k
    smallest, so any split of the values into blocks, merged in any order, keeps the same
    values (as a multiset; the order along the last axis is unspecified).

    Args:
        kept: (Q, L, a) values kept so far, or None.
        block: (Q, L, b) new values.
        k: how many to keep, >= 1.

    Returns:
        (Q, L, min(k, a + b)) values.
    """
    both = block if kept is None else torch.cat([kept, block], dim=-1)
    if both.shape[-1] <= k:
        return both
    return torch.topk(both, k, dim=-1, largest=False, sorted=False).values


class MutualScoreBlocks:
    """MSM scores of some query images of a batch, from reference blocks given one by one.

    Equals :func:`mutual_scores` on the whole batch for these queries (up to the rounding of
    the distance blocks): for each query patch only the ``hi`` smallest per-image NN
    distances are kept (:func:`merge_smallest`), which is all the interval average needs.
    Every image of the batch (the queries' own images included: their distances to
    themselves are masked) must be added exactly once, in any order and any blocking; a
    reference image added twice, or one missing when :meth:`scores` is called, raises an
    error, so a dropped or double-counted block cannot go unnoticed.

    Memory: (Q, L, hi + R) float32 for Q queries and blocks of R reference images, where
    ``hi`` = :func:`interval_bounds` upper rank (about 0.3 N by default).

    Args:
        query_ids: (Q,) batch positions of the query images.
        num_images: N, the images of the batch (the scoring set) the queries belong to.
        topmin_min: lower bound of the averaged interval (see :func:`interval_bounds`).
        topmin_max: upper bound of the averaged interval.
    """

    def __init__(
        self,
        query_ids: Sequence[int],
        num_images: int,
        topmin_min: float = 0.0,
        topmin_max: float = 0.3,
    ) -> None:
        self.query_ids = torch.as_tensor(list(query_ids), dtype=torch.int64)
        self.num_images = int(num_images)
        self.lo, self.hi = interval_bounds(self.num_images - 1, topmin_min, topmin_max)
        self.kept: torch.Tensor | None = None
        self.seen: set[int] = set()

    def add(self, distances: torch.Tensor, ref_ids: Sequence[int]) -> None:
        """Merge one block of NN distances.

        Args:
            distances: (Q, L, R) from :func:`nn_distances` (queries x these references).
            ref_ids: (R,) batch positions of the reference images of the block.
        """
        ids = [int(i) for i in ref_ids]
        if distances.ndim != 3 or distances.shape[0] != len(self.query_ids):
            raise ValueError(
                f"distances must be (Q={len(self.query_ids)}, L, R), got {tuple(distances.shape)}"
            )
        if distances.shape[2] != len(ids):
            raise ValueError(f"{distances.shape[2]} distance columns but {len(ids)} reference ids")
        twice = self.seen.intersection(ids)
        if twice or len(set(ids)) != len(ids):
            raise ValueError(
                f"reference image(s) {sorted(twice) or ids} given twice: each image of the "
                "batch must be counted once"
            )
        if any(not 0 <= i < self.num_images for i in ids):
            raise ValueError(f"reference ids must lie in [0, {self.num_images}), got {ids}")
        self.seen.update(ids)
        d = distances.float()
        own = self.query_ids.to(d.device)[:, None] == torch.as_tensor(ids, device=d.device)
        if bool(own.any()):
            d = d.masked_fill(own[:, None, :], float("inf"))  # not compared with itself
        self.kept = merge_smallest(self.kept, d, self.hi)

    def scores(self) -> torch.Tensor:
        """(Q, L) float32: mean of the sorted kept distances of ranks [lo, hi).

        Raises:
            ValueError: not every image of the batch was added.
        """
        if len(self.seen) != self.num_images or self.kept is None:
            missing = sorted(set(range(self.num_images)) - self.seen)
            raise ValueError(
                f"{len(missing)} reference image(s) of the batch of {self.num_images} were "
                f"never added (e.g. {missing[:5]}): a block is missing"
            )
        smallest = torch.sort(self.kept, dim=2).values
        return smallest[:, :, self.lo : self.hi].mean(dim=2)


# ------------------------------------------------------------------------------ subsets
def divide_subsets(groups: Sequence[str], divide_num: int, seed: int = 42) -> list[list[int]]:
    """Stratified split of a category into ``divide_num`` subsets (official ``divide_num``).

    As the official dataset class: groups (defect-type folders) are visited in sorted order;
    the positions of each group are shuffled with one ``random.Random(seed)`` stream shared
    by all groups, cut into consecutive chunks of ``divide_num``, and subset t takes the t-th
    element of every chunk. Groups smaller than ``divide_num`` therefore feed only the first
    subsets. Within a group, positions keep the caller's order before the shuffle (the
    official dataset lists files by sorted name; give them in that order to reproduce its
    subsets exactly). ``divide_num = 1`` keeps everything in one subset, in input order.

    Args:
        groups: one group label per image (e.g. the defect-type folder name).
        divide_num: number of subsets, >= 1.
        seed: seed of the shuffle (the official script passes 42).

    Returns:
        ``divide_num`` lists of positions into ``groups`` (an empty list for a subset that
        gets no image), each in the official row order.
    """
    if divide_num < 1:
        raise ValueError(f"divide_num must be >= 1, got {divide_num}")
    if divide_num == 1:
        return [list(range(len(groups)))]
    rng = random.Random(seed)
    subsets: list[list[int]] = [[] for _ in range(divide_num)]
    for name in sorted(set(groups)):
        positions = [i for i, g in enumerate(groups) if g == name]
        rng.shuffle(positions)
        for t in range(divide_num):
            subsets[t].extend(positions[t::divide_num])
    return subsets


# ------------------------------------------------------------------------- maps and scores
def fuse_scores(scores: torch.Tensor) -> torch.Tensor:
    """Average MSM scores over layers, then over degrees r, in float64.

    Args:
        scores: (R, Lyr, N, L) scores for R degrees and Lyr layers.

    Returns:
        (N, L) float64 fused patch scores.
    """
    if scores.ndim != 4:
        raise ValueError(f"scores must be (R, layers, N, L), got shape {tuple(scores.shape)}")
    return scores.double().mean(dim=1).mean(dim=0)


def upsample_maps(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling with ``align_corners=True`` (no smoothing), in the input dtype.

    Args:
        maps: (N, h, w) patch-level maps.
        size: output size S or (H, W).

    Returns:
        (N, H, W) maps.
    """
    return upsample(maps, size, mode="bilinear", align_corners=True)


def max_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image score = max over pixels. (N, H, W) -> (N,)."""
    return maps.flatten(1).amax(dim=1)


# ----------------------------------------------------------------------------------- RsCIN
def minmax_normalize(scores: torch.Tensor) -> torch.Tensor:
    """(s - min) / (max - min) over the batch; all-equal scores map to 0 (no NaN). (N,) -> (N,)."""
    lo = scores.min()
    span = scores.max() - lo
    if span == 0:
        return torch.zeros_like(scores)
    return (scores - lo) / span


def rscin(
    scores: torch.Tensor, embeddings: torch.Tensor, k_list: Sequence[int] = (1, 2, 3)
) -> torch.Tensor:
    """Re-scoring with Constrained Image-level Neighbourhood (RsCIN), in float32.

    Scores are min-max normalised; W = G G^T (cosine similarities, diagonal included); for each
    k the k largest entries of every row are kept (k = 1: the image itself), rows are divided
    by their sums, and the normalised scores are averaged with these weights. The result is
    the mean over ``k_list``. ``k_list`` empty or containing 0 disables RsCIN (the input scores
    are returned as float32). k larger than N is clamped to N.

    Args:
        scores: (N,) image scores.
        embeddings: (N, D) L2-normalised global image embeddings.
        k_list: neighbourhood sizes (MVTec default 1, 2, 3; VisA 1, 8, 9).

    Returns:
        (N,) float32 re-scored image scores.
    """
    if scores.ndim != 1 or embeddings.ndim != 2 or embeddings.shape[0] != scores.shape[0]:
        raise ValueError(
            "rscin needs scores (N,) and embeddings (N, D) with the same N, got "
            f"{tuple(scores.shape)} and {tuple(embeddings.shape)}"
        )
    if len(k_list) == 0 or 0 in k_list:
        return scores.float()
    if min(k_list) < 0:
        raise ValueError(f"k_list entries must be >= 0, got {list(k_list)}")
    n = scores.shape[0]
    s = minmax_normalize(scores).float()
    g = embeddings.float()
    sim = g @ g.T
    out = torch.zeros(n, dtype=torch.float32, device=scores.device)
    for k in k_list:
        kk = min(int(k), n)
        idx = torch.topk(sim, kk, dim=1, largest=True).indices
        w = torch.zeros_like(sim).scatter_(1, idx, sim.gather(1, idx))
        w = w / w.sum(dim=1, keepdim=True)
        out += w @ s
    return out / len(k_list)
