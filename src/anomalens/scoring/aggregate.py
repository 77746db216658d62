"""Window index sets on a patch grid and harmonic aggregation of window scores (WinCLIP).

Pure tensor functions. Patches are numbered row-major on an (H, W) grid: patch (i, j) has index
``i * W + j``. A window of scale k is the k x k block of patch indices it covers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "harmonic_mean",
    "harmonic_window_aggregate",
    "window_index_sets",
]


def _positions(length: int, k: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis; the last window always touches the border."""
    starts = list(range(0, length - k + 1, stride))
    if starts[-1] != length - k:
        starts.append(length - k)
    return starts


def window_index_sets(
    grid_size: int | tuple[int, int], scale: int, stride: int = 1
) -> torch.Tensor:
    """Patch indices of every ``scale x scale`` window on the patch grid.

    Windows slide row-major with ``stride`` patches; if the stride does not reach the border a
    final window aligned with the border is added so every patch is covered.

    Args:
        grid_size: patch grid (H, W), or one int for a square grid.
        scale: window side k in patches, 1 <= k <= min(H, W).
        stride: step between windows in patches (WinCLIP: 1).

    Returns:
        (M, k*k) long tensor; row m lists the covered patch indices row-major.
        For H = W = 15, k = 2, stride 1: M = 196.
    """
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if scale < 1 or scale > min(h, w):
        raise ValueError(
            f"window scale must be in [1, {min(h, w)}] for a {h}x{w} grid, got {scale}"
        )
    if stride < 1:
        raise ValueError(f"window stride must be >= 1, got {stride}")
    grid = torch.arange(h * w, dtype=torch.long).view(h, w)
    rows = []
    for i in _positions(h, scale, stride):
        for j in _positions(w, scale, stride):
            rows.append(grid[i : i + scale, j : j + scale].reshape(-1))
    return torch.stack(rows)


def harmonic_window_aggregate(
    window_scores: torch.Tensor, index_sets: torch.Tensor, num_patches: int
) -> torch.Tensor:
    """Spread window scores to patches with a harmonic mean over the windows covering each patch.

    ``out[u] = |W(u)| / sum_{w in W(u)} 1 / s_w``. A zero score among the covering windows gives
    0 (the limit of the harmonic mean); a patch covered by no window gives 0.

    Args:
        window_scores: (B, M) non-negative scores, one per window.
        index_sets: (M, n) long patch indices covered by each window.
        num_patches: N, number of patches of the grid.

    Returns:
        (B, N) per-patch scores.
    """
    if window_scores.ndim != 2 or index_sets.ndim != 2:
        raise ValueError(
            f"need window_scores (B, M) and index_sets (M, n), got {tuple(window_scores.shape)} "
            f"and {tuple(index_sets.shape)}"
        )
    if window_scores.shape[1] != index_sets.shape[0]:
        raise ValueError(
            f"{window_scores.shape[1]} window scores but {index_sets.shape[0]} index sets"
        )
    b, _ = window_scores.shape
    n = index_sets.shape[1]
    idx = index_sets.to(window_scores.device).reshape(-1)  # (M*n,)
    inv = (1.0 / window_scores.float()).repeat_interleave(n, dim=1)  # (B, M*n)
    inv_sum = torch.zeros(b, num_patches, dtype=inv.dtype, device=inv.device)
    inv_sum.index_add_(1, idx, inv)
    count = torch.bincount(idx, minlength=num_patches).to(inv.dtype)  # (N,)
    out = count / inv_sum  # inf sum -> 0; uncovered 0 / 0 -> nan
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def harmonic_mean(values: torch.Tensor | Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Element-wise harmonic mean ``n / sum_i 1 / x_i`` of non-negative values.

    The one harmonic mean of the package (WinCLIP's language map, AdaptCLIP's align map and
    few-shot fusion). Every caller gets the same handling of the edge cases:

    * a zero term gives 0 (the limit: ``1 / 0 = inf``, ``n / inf = 0``);
    * a result that is not finite (a NaN term, or an infinite one cancelling another) is 0, so a
      single bad value never spreads into the smoothing that usually follows.

    Args:
        values: one tensor reduced along ``dim``, e.g. (B, L, S, S) per-layer maps with
            ``dim=1``; or a sequence of broadcastable tensors, e.g. (B, N), (B, N) and (B, 1),
            (``dim`` is then ignored).
        dim: dimension to reduce when ``values`` is one tensor.

    Returns:
        The broadcast shape without ``dim``; float32, or float64 for float64 input.
    """
    terms = values.unbind(dim) if isinstance(values, torch.Tensor) else tuple(values)
    if len(terms) == 0:
        raise ValueError("harmonic_mean needs at least one value")
    inv_sum: torch.Tensor | None = None
    for t in terms:  # summed in order: the same rounding for a tensor and a sequence
        inv = 1.0 / (t if t.dtype == torch.float64 else t.float())
        inv_sum = inv if inv_sum is None else inv_sum + inv
    assert inv_sum is not None
    return torch.nan_to_num(len(terms) / inv_sum, nan=0.0, posinf=0.0, neginf=0.0)
