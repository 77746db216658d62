"""Test helpers for MuSc: fixture paths and a reference tiny-CLIP feature extractor.

The reference extractor builds the parity fixtures' tiny CLIP directly from open_clip modules
following the fixture README (plain GELU, positional embedding resized bicubic without
antialias, raw residual streams after blocks 6/12/18/24), independently of
``anomalens.backbones.clip``. It lets the MuSc stages be checked against the recorded tensors
even when the CLIP backbone wrapper is not available.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from anomalens.data.io import ImageLike
from anomalens.data.transforms import CLIP_MEAN, CLIP_STD, to_batch
from anomalens.detectors.musc import PatchFeatures

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
TINY_CLIP = SHARED / "fixtures" / "adaptclip_parity" / "clip_tiny_openai.safetensors"


def musc_parity_dir() -> Path:
    """Folder of the MuSc parity fixtures (env ``ANOMALENS_MUSC_PARITY_DIR`` overrides)."""
    env = os.environ.get("ANOMALENS_MUSC_PARITY_DIR")
    return Path(env) if env else SHARED / "fixtures" / "musc_parity"


def load_tiny_visual(path: Path = TINY_CLIP, image_size: int = 518) -> torch.nn.Module:
    """open_clip VisionTransformer of the fixtures' tiny CLIP at ``image_size`` (float32, GELU)."""
    from open_clip.model import _build_vision_tower
    from safetensors.torch import load_file

    sd = load_file(str(path))
    visual_sd = {k[len("visual.") :]: v.float() for k, v in sd.items() if k.startswith("visual.")}
    cfg = {"image_size": image_size, "layers": 24, "width": 64, "patch_size": 14, "head_width": 64}
    visual = _build_vision_tower(768, cfg, quick_gelu=False)
    pos = visual_sd["positional_embedding"]
    old = round((pos.shape[0] - 1) ** 0.5)
    new = image_size // 14
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    visual_sd["positional_embedding"] = torch.cat(
        [pos[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1)]
    )
    visual.load_state_dict(visual_sd, strict=True)
    return visual.eval()


class ReferenceTinyClipExtractor:
    """PatchFeatureExtractor over :func:`load_tiny_visual` (blocks are 1-based)."""

    def __init__(self, visual: torch.nn.Module, layers: Sequence[int] = (6, 12, 18, 24)) -> None:
        self.visual = visual
        self.layers = tuple(layers)

    def preprocess(self, images: Sequence[ImageLike], size: int) -> torch.Tensor:
        return to_batch(images, size, CLIP_MEAN, CLIP_STD, "bicubic")

    @torch.no_grad()
    def blocks(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, 3, S, S) -> raw residual streams (B, 1+L, C) per layer, (B, D) embedding."""
        v = self.visual
        t = v.conv1(x)
        b, c, h, w = t.shape
        t = t.reshape(b, c, h * w).transpose(1, 2)
        cls = v.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(t.dtype)
        t = torch.cat([cls, t], dim=1) + v.positional_embedding.to(t.dtype)
        t = v.ln_pre(t)
        last, inter = v.transformer.forward_intermediates(t, indices=[i - 1 for i in self.layers])
        emb = v.ln_post(last[:, 0]) @ v.proj
        return list(inter), emb

    def extract(self, x: torch.Tensor) -> PatchFeatures:
        inter, emb = self.blocks(x)
        n = inter[0].shape[1] - 1
        side = round(n**0.5)
        return PatchFeatures([t[:, 1:] for t in inter], [(side, side)] * len(inter), emb)

    def describe(self) -> dict[str, Any]:
        return {"backbone": "reference-tiny-clip", "backbone_layers": list(self.layers)}
