"""Greedy k-center coreset selection (PatchCore memory-bank subsampling).

Points are selected in a seeded random projection (only for choosing indices; callers keep the
original features). Memory is O(n): one running "distance to the coreset" vector, never an
n x n matrix.
"""

from __future__ import annotations

import math

import torch

__all__ = ["coreset_size", "greedy_coreset", "random_projection"]


def coreset_size(n: int, ratio: float | None = None, size: int | None = None) -> int:
    """Number of points to keep: exactly one of ``ratio`` (floor(ratio * n), at least 1) or
    ``size``; never more than n."""
    if (ratio is None) == (size is None):
        raise ValueError("give exactly one of ratio or size for the coreset")
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        m = max(1, math.floor(ratio * n))
    else:
        assert size is not None
        if size < 1:
            raise ValueError(f"coreset size must be >= 1, got {size}")
        m = size
    return min(m, n)


def random_projection(features: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Project (n, d) features to (n, dim) with a seeded Gaussian matrix scaled by 1/sqrt(dim)
    (Johnson-Lindenstrauss). Returns the input unchanged when d <= dim or dim <= 0."""
    d = features.shape[1]
    if dim <= 0 or d <= dim:
        return features
    gen = torch.Generator().manual_seed(int(seed))
    proj = torch.randn(d, dim, generator=gen, dtype=torch.float32) / math.sqrt(dim)
    return features @ proj.to(device=features.device, dtype=features.dtype)


def greedy_coreset(
    features: torch.Tensor,
    ratio: float | None = None,
    size: int | None = None,
    seed: int = 0,
    projection_dim: int = 128,
) -> torch.Tensor:
    """Greedy k-center selection: repeatedly add the point farthest from the current coreset.

    Args:
        features: (n, d) features.
        ratio: keep floor(ratio * n) points (at least 1); or
        size: keep this many points (exactly one of ratio / size).
        seed: seeds both the random projection and the random start point.
        projection_dim: projection size used for selection (<= 0: no projection).

    Returns:
        (m,) int64 indices into ``features``, in selection order (first = random start).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (n, d), got {tuple(features.shape)}")
    n = features.shape[0]
    if n == 0:
        raise ValueError("cannot build a coreset of zero features")
    m = coreset_size(n, ratio, size)
    device = features.device
    if m == n:
        return torch.arange(n, device=device)
    y = random_projection(features.float(), projection_dim, seed)
    gen = torch.Generator().manual_seed(int(seed))
    start = int(torch.randint(n, (1,), generator=gen).item())
    selected = torch.empty(m, dtype=torch.long, device=device)
    selected[0] = start
    min_dist = torch.linalg.vector_norm(y - y[start], dim=1)  # (n,)
    for i in range(1, m):
        c = torch.argmax(min_dist)
        selected[i] = c
        torch.minimum(min_dist, torch.linalg.vector_norm(y - y[c], dim=1), out=min_dist)
    return selected
