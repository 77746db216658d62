"""Reproducible k-shot draws of normal reference images.

Rules:

* ``without_replacement`` (default): ``numpy.random.default_rng(seed).choice(n, k,
  replace=False)``; k distinct images, in draw order.
* ``adaptclip``: the official AdaptCLIP ``PromptDataset`` draw, reproduced exactly: the torch
  CPU generator is seeded with ``seed`` and ``torch.randint(0, n, (k,))`` gives the indices,
  **with replacement** (the same image can appear twice). The official code reseeds once per
  class, in ``meta.json`` class order; calling this function once per class does the same. A
  private ``torch.Generator`` is used, so the global torch RNG is left untouched while the
  numbers equal those of ``torch.manual_seed(seed); torch.randint(...)``.
* ``first``: the first k images in index order (anomalib WinCLIP's choice).

The pool must hold normal training images only: an empty pool is an error (the official code
then silently draws from the test split, which leaks queries into the references).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from anomalens.types import Sample

__all__ = ["SHOT_RULES", "sample_shots"]

SHOT_RULES: tuple[str, ...] = ("without_replacement", "adaptclip", "first")


def sample_shots(
    train_samples: Sequence[Sample], k: int, seed: int, rule: str = "without_replacement"
) -> list[Sample]:
    """Draw ``k`` normal reference samples from ``train_samples``.

    Args:
        train_samples: pool of normal (label 0) training samples, in index order.
        k: number of shots; 0 returns ``[]``.
        seed: random seed (the same seed and pool give the same draw).
        rule: one of ``SHOT_RULES`` (see the module docstring).

    Returns:
        The k drawn samples in draw order.

    Raises:
        ValueError: unknown rule, negative k, empty pool, a non-normal sample in the pool, or
            k larger than the pool for the rules without replacement.
    """
    if rule not in SHOT_RULES:
        raise ValueError(f"unknown shot rule {rule!r}; expected one of {', '.join(SHOT_RULES)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:
        return []
    pool = list(train_samples)
    n = len(pool)
    if n == 0:
        raise ValueError(
            f"cannot draw {k} reference image(s): the pool of normal training images is empty "
            "(references are never drawn from the test split)"
        )
    bad = [s.image_path for s in pool if s.label != 0]
    if bad:
        raise ValueError(
            f"reference pool must hold normal images only (label 0); {len(bad)} do not, "
            f"e.g. {bad[0]}"
        )
    if rule == "adaptclip":
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        idx = torch.randint(0, n, (k,), generator=gen).tolist()
        return [pool[i] for i in idx]
    if k > n:
        raise ValueError(
            f"cannot draw k={k} distinct reference images from a pool of {n} "
            f"(rule {rule!r}; use k <= {n})"
        )
    if rule == "first":
        return pool[:k]
    rng = np.random.default_rng(seed)
    return [pool[int(i)] for i in rng.choice(n, size=k, replace=False)]
