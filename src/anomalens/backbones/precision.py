"""Backbone precision names and their torch dtypes.

A backbone built with ``precision="fp16"`` or ``"bf16"`` holds its weights and runs its
activations in that dtype (cast, not autocast); its outputs are float32 whatever the precision.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["PRECISION_DTYPES", "Precision", "precision_dtype", "precision_name"]

Precision = Literal["fp32", "fp16", "bf16"]

#: Precision name -> dtype of the weights and activations.
PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype of a precision name.

    Raises:
        ValueError: not one of ``"fp32"``, ``"fp16"``, ``"bf16"``.
    """
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}")
    return PRECISION_DTYPES[precision]


def precision_name(dtype: torch.dtype) -> str:
    """The precision name of a dtype (``"float64"`` style for one without a name)."""
    for name, d in PRECISION_DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).replace("torch.", "")
