"""A tiny random CLIP for fast offline tests and smoke runs.

``anomalens-tiny-clip`` (the architecture: :mod:`anomalens.backbones.clip_configs`, registered with
open_clip) is built here with seeded, non-trivial random weights: 64 px with 8 px patches (8x8
grid), vision width 64 with 4 blocks, text width 32 with 3 blocks, joint width 32.
"""

from __future__ import annotations

import torch
from torch import nn

from anomalens.backbones.clip_backbone import ClipBackbone
from anomalens.backbones.clip_checkpoint import build_open_clip
from anomalens.backbones.clip_configs import TINY_CLIP_CONFIG, TINY_CLIP_NAME, register_tiny_clip
from anomalens.backbones.precision import Precision

__all__ = [
    "TINY_CLIP_CONFIG",
    "TINY_CLIP_NAME",
    "make_tiny_clip",
    "randomise_clip_",
    "register_tiny_clip",
]


@torch.no_grad()
def randomise_clip_(model: nn.Module, seed: int = 0) -> None:
    """Give every parameter a non-trivial random value, in place (seeded, CPU generator).

    open_clip's own init leaves biases at 0 and LayerNorms at identity, which hides bugs in
    tests. Here: matrices ~ N(0, 1/fan_in); biases ~ N(0, 0.02^2); LayerNorm weights ~
    U(0.9, 1.1), biases ~ N(0, 0.05^2); embeddings ~ N(0, 0.02^2); visual class / positional
    embeddings ~ N(0, 0.5^2); logit_scale = log(1/0.07).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "logit_scale":
            p.fill_(float(torch.log(torch.tensor(1 / 0.07))))
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_ln = ".ln_" in f".{name}" or name.startswith("ln_")
        if name in ("visual.class_embedding", "visual.positional_embedding"):
            v = torch.randn(p.shape, generator=gen) * 0.5
        elif is_ln and leaf == "weight":
            v = torch.rand(p.shape, generator=gen) * 0.2 + 0.9
        elif is_ln and leaf == "bias":
            v = torch.randn(p.shape, generator=gen) * 0.05
        elif leaf.endswith("bias"):
            v = torch.randn(p.shape, generator=gen) * 0.02
        elif name in ("token_embedding.weight", "positional_embedding"):
            v = torch.randn(p.shape, generator=gen) * 0.02
        elif p.ndim >= 2:
            fan_in = p[0].numel() if name.endswith("weight") else p.shape[0]
            v = torch.randn(p.shape, generator=gen) / fan_in**0.5
        else:
            v = torch.randn(p.shape, generator=gen) * 0.02
        p.copy_(v.to(p.dtype))


def make_tiny_clip(
    seed: int = 0,
    image_size: int | None = None,
    precision: Precision = "fp32",
    device: str | torch.device = "cpu",
) -> ClipBackbone:
    """Tiny CLIP backbone with seeded, non-trivial random weights (:func:`randomise_clip_`).

    Args:
        seed: weight seed.
        image_size: input side (multiple of 8); None keeps the native 64.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        device: target device.
    """
    register_tiny_clip()
    model = build_open_clip(TINY_CLIP_NAME, seed)
    randomise_clip_(model, seed)
    return ClipBackbone(
        model,
        image_size=image_size,
        precision=precision,
        device=device,
        model_name=TINY_CLIP_NAME,
        pretrained=None,
    )
