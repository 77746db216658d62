"""CLIP backbone on open_clip: the public names in one import.

``from anomalens.backbones.clip import ClipBackbone`` keeps working; the code lives in modules
split along its concerns:

* :mod:`~anomalens.backbones.clip_backbone`: :class:`ClipBackbone` (state, constructors,
  preprocessing, the public encode methods);
* :mod:`~anomalens.backbones.clip_vision`: the tapped vision tower, the V-V attention path,
  WinCLIP windows, tap validation and the output records;
* :mod:`~anomalens.backbones.clip_text`: the text tower (token ids, learnable and deep prompts);
* :mod:`~anomalens.backbones.pos_embed`: the positional-embedding resize (``mode``);
* :mod:`~anomalens.backbones.clip_checkpoint`: checkpoint files, the OpenAI key layout, strict
  loading, weightless seeded builds;
* :mod:`~anomalens.backbones.clip_weights`: open_clip pretrained tags, offline first;
* :mod:`~anomalens.backbones.clip_build` and :mod:`~anomalens.backbones.precision`: building a
  detector's backbone, precision names;
* :mod:`~anomalens.backbones.clip_configs`: the tiny test architecture registered with open_clip.

Block numbers are **1-indexed** (block 1 is the first transformer block), as in the method
papers. See ``docs/clip_backbone.md`` for the contract and the presets.
"""

from __future__ import annotations

from anomalens.backbones.clip_backbone import ClipBackbone
from anomalens.backbones.clip_build import build_clip_backbone, musc_clip_backbone
from anomalens.backbones.clip_checkpoint import (
    OPENAI_JIT_ONLY_KEYS,
    load_state_dict_file,
    openai_clip_config,
)
from anomalens.backbones.clip_vision import (
    ClipImageFeatures,
    ClipImageTokens,
    check_taps,
    vv_dual_block,
)
from anomalens.backbones.pos_embed import PosEmbedMode, resize_positional_embedding
from anomalens.backbones.precision import Precision

__all__ = [
    "OPENAI_JIT_ONLY_KEYS",
    "ClipBackbone",
    "ClipImageFeatures",
    "ClipImageTokens",
    "PosEmbedMode",
    "Precision",
    "build_clip_backbone",
    "check_taps",
    "load_state_dict_file",
    "musc_clip_backbone",
    "openai_clip_config",
    "resize_positional_embedding",
    "vv_dual_block",
]
