"""Nearest-neighbour distances to a memory bank and PatchCore's image-score re-weighting.

Pure tensor functions: exact (brute-force) Euclidean search, chunked over the queries so that
at most ``chunk x M`` distances are held at once.
"""

from __future__ import annotations

import torch

__all__ = [
    "knn",
    "nearest_neighbor_distance",
    "pairwise_l2",
    "reweighted_image_score",
]

#: Default number of distance entries held at once (chunk rows x memory size), ~64 MB float32.
_DEFAULT_BUDGET = 1 << 24


def pairwise_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """True Euclidean distances between rows.

    Args:
        a: (N, D) rows.
        b: (M, D) rows.

    Returns:
        (N, M) distances ``||a_i - b_j||``; squared values are clamped at 0 before the sqrt.
    """
    d2 = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d2.clamp_min_(0.0).sqrt_()


def _check(queries: torch.Tensor, memory: torch.Tensor, k: int) -> None:
    if queries.ndim != 2 or memory.ndim != 2:
        raise ValueError(
            f"queries and memory must be (N, D) and (M, D), got {tuple(queries.shape)} "
            f"and {tuple(memory.shape)}"
        )
    if queries.shape[1] != memory.shape[1]:
        raise ValueError(
            f"feature sizes differ: queries have D={queries.shape[1]}, memory D={memory.shape[1]}"
        )
    if memory.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    if not 1 <= k <= memory.shape[0]:
        raise ValueError(f"k must be in [1, {memory.shape[0]}] (memory size), got {k}")


def knn(
    queries: torch.Tensor,
    memory: torch.Tensor,
    k: int = 1,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest memory items of every query (true L2).

    Candidates are ranked with the ``|q|^2 - 2 q.m + |m|^2`` expansion (one matrix product per
    chunk); the returned distances of the k selected items are recomputed directly as
    ``||q - m||``, so they are exact (zero for identical points).

    Args:
        queries: (N, D) query features.
        memory: (M, D) memory bank.
        k: neighbours per query (1 <= k <= M).
        chunk: queries processed at once (default: chunk x max(M, k x D) <= 2^24 entries).

    Returns:
        distances (N, k) ascending and indices (N, k) int64 into ``memory``.
    """
    _check(queries, memory, k)
    n, m = queries.shape[0], memory.shape[0]
    step = chunk if chunk is not None else max(1, _DEFAULT_BUDGET // max(m, k * queries.shape[1]))
    if step < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    m_sq = (memory * memory).sum(1)
    dists = torch.empty((n, k), dtype=queries.dtype, device=queries.device)
    idx = torch.empty((n, k), dtype=torch.long, device=queries.device)
    for s in range(0, n, step):
        q = queries[s : s + step]
        d2 = (q * q).sum(1, keepdim=True) - 2.0 * (q @ memory.T) + m_sq[None, :]
        ind = torch.topk(d2, k, dim=1, largest=False, sorted=True).indices
        # exact distances of the selected neighbours (the expansion above loses precision
        # to cancellation when ||q|| and ||m|| are large compared with ||q - m||)
        exact = torch.linalg.vector_norm(q[:, None, :] - memory[ind], dim=-1)
        exact, order = exact.sort(dim=1)
        dists[s : s + step] = exact
        idx[s : s + step] = ind.gather(1, order)
    return dists, idx


def nearest_neighbor_distance(
    queries: torch.Tensor,
    memory: torch.Tensor,
    k: int = 1,
    chunk: int | None = None,
) -> torch.Tensor:
    """Patch score: mean L2 distance of each query to its k nearest memory items.

    Args:
        queries: (N, D) features.
        memory: (M, D) memory bank.
        k: neighbours averaged (k = 1: distance to the nearest item).
        chunk: queries per chunk (see ``knn``).

    Returns:
        (N,) distances, >= 0.
    """
    d, _ = knn(queries, memory, k=k, chunk=chunk)
    return d.mean(1)


def reweighted_image_score(
    patch_scores: torch.Tensor,
    queries: torch.Tensor,
    nn_index: torch.Tensor,
    memory: torch.Tensor,
    num_neighbors: int = 9,
) -> torch.Tensor:
    """PatchCore paper / anomalib image score: the max patch score, down-weighted when the
    nearest memory item lies in a dense region of the memory bank.

    For each image: ``m*`` = patch with the largest score ``s*``, ``x*`` = its nearest memory
    item, ``N_b(x*)`` = the b nearest memory items of ``x*`` (``x*`` included). Then
    ``w = 1 - softmax_j(||m* - x_j||)[x*]`` over ``x_j`` in ``N_b(x*)`` and the score is
    ``w * s*``. With b = 1 the score is ``s*`` (anomalib convention). b is clipped to M.

    Args:
        patch_scores: (B, P) patch scores.
        queries: (B, P, D) patch features.
        nn_index: (B, P) index of each patch's nearest memory item.
        memory: (M, D) memory bank.
        num_neighbors: b.

    Returns:
        (B,) image scores.
    """
    if patch_scores.ndim != 2 or queries.ndim != 3 or nn_index.shape != patch_scores.shape:
        raise ValueError(
            "expected patch_scores (B, P), queries (B, P, D), nn_index (B, P); got "
            f"{tuple(patch_scores.shape)}, {tuple(queries.shape)}, {tuple(nn_index.shape)}"
        )
    s_star, p_star = patch_scores.max(dim=1)  # (B,)
    b = min(int(num_neighbors), memory.shape[0])
    if b <= 1:
        return s_star
    rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    m_star = queries[rows, p_star]  # (B, D)
    x_idx = nn_index[rows, p_star]  # (B,)
    x_star = memory[x_idx]  # (B, D)
    d_mem = pairwise_l2(x_star, memory)  # (B, M)
    d_mem[rows, x_idx] = -1.0  # x* itself first, even when the bank holds duplicates of it
    support = torch.topk(d_mem, b, dim=1, largest=False).indices  # (B, b), support[:, 0] = x*
    d_support = torch.linalg.vector_norm(m_star[:, None, :] - memory[support], dim=-1)  # (B, b)
    w = 1.0 - torch.softmax(d_support, dim=1)[:, 0]
    return w * s_star
