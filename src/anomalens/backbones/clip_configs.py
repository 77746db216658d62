"""open_clip architecture configs that anomalens adds: the tiny test CLIP.

``anomalens-tiny-clip`` is registered with ``open_clip.add_model_config``: OpenAI layout, QuickGELU,
native 64 px with 8 px patches (8x8 grid), vision width 64 with 2 heads and 4 blocks, text width
32 with 2 heads and 3 blocks, joint width 32, the real CLIP tokenizer (context 77, vocabulary 49408).

This module only registers the architecture (data); building it with seeded random weights is
:func:`anomalens.backbones.tiny.make_tiny_clip`.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import open_clip

__all__ = ["TINY_CLIP_CONFIG", "TINY_CLIP_NAME", "register_tiny_clip"]

TINY_CLIP_NAME = "anomalens-tiny-clip"
TINY_CLIP_CONFIG: dict[str, object] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}

_config_dir: Path | None = None


def register_tiny_clip() -> str:
    """Register ``anomalens-tiny-clip`` with open_clip (idempotent); returns the name.

    open_clip reads model configs from folders, so the JSON is written to a private temporary
    folder that lives until the interpreter exits.
    """
    global _config_dir
    if _config_dir is not None and open_clip.get_model_config(TINY_CLIP_NAME) is not None:
        return TINY_CLIP_NAME
    folder = Path(tempfile.mkdtemp(prefix="anomalens-openclip-"))
    (folder / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    atexit.register(shutil.rmtree, folder, True)
    _config_dir = folder
    open_clip.add_model_config(folder)
    return TINY_CLIP_NAME
