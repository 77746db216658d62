"""AnomalyCLIP prompt-learner checkpoints: official ``.pth`` remapping and our safetensors files.

Official format (``train.py``): ``torch.save({"prompt_learner": state_dict})`` with

* ``ctx_pos`` (1, 1, n_ctx, W): the NORMAL context; ``ctx_neg`` (1, 1, n_ctx, W): the ABNORMAL one;
* ``compound_prompts_text.{j}`` (t_n_ctx, W): deep prompts for text blocks j + 2;
* ``compound_prompt_projections.{j}.weight/bias``: never used by the forward (dropped);
* buffers ``token_prefix_*``, ``token_suffix_*``, ``tokenized_prompts_*``: derived from the CLIP
  token embedding, rebuilt from the backbone here (dropped).

Ours: ``ctx_normal``, ``ctx_abnormal`` (n_ctx, W) and ``deep_prompts.{j}`` (t_n_ctx, W), as
safetensors in the layout of ``detectors._checkpoint`` (shared with AdaptCLIP).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from anomalens.detectors._anomalyclip_modules import PromptConfig
from anomalens.detectors._checkpoint import CheckpointInfo, read_checkpoint_file, save_checkpoint

__all__ = [
    "CHECKPOINT_KIND",
    "checkpoint_filter_fn",
    "config_from_state_dict",
    "load_prompt_checkpoint",
    "save_prompt_checkpoint",
]

#: ``kind`` metadata value of our prompt files.
CHECKPOINT_KIND = "anomalyclip.prompts"

_DEEP_OFFICIAL = re.compile(r"^compound_prompts_text\.(\d+)$")
_DEEP_OURS = re.compile(r"^deep_prompts\.(\d+)$")
_DROPPED_PREFIXES = (
    "compound_prompt_projections.",
    "token_prefix",
    "token_suffix",
    "tokenized_prompts",
)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remap an official AnomalyCLIP prompt-learner state dict onto our module's keys.

    Accepts the whole official checkpoint (``{"prompt_learner": ...}``), its inner state dict,
    a ``module.``-prefixed one, or a state dict already in our layout (returned as float32).

    Returns:
        ``{"ctx_normal": (n, W), "ctx_abnormal": (n, W), "deep_prompts.j": (t, W)}`` float32.

    Raises:
        KeyError: a required key is missing or an unknown key is present.
    """
    sd: Mapping[str, torch.Tensor] = state_dict
    if "prompt_learner" in sd and isinstance(sd["prompt_learner"], Mapping):
        sd = sd["prompt_learner"]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key in ("ctx_pos", "ctx_normal"):
            out["ctx_normal"] = value.reshape(value.shape[-2:]).float()
        elif key in ("ctx_neg", "ctx_abnormal"):
            out["ctx_abnormal"] = value.reshape(value.shape[-2:]).float()
        elif m := _DEEP_OFFICIAL.match(key) or _DEEP_OURS.match(key):
            out[f"deep_prompts.{int(m.group(1))}"] = value.float()
        elif key.startswith(_DROPPED_PREFIXES):
            continue
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"unexpected keys in an AnomalyCLIP prompt-learner checkpoint: {unknown}")
    missing = [k for k in ("ctx_normal", "ctx_abnormal") if k not in out]
    if missing:
        raise KeyError(
            f"AnomalyCLIP checkpoint lacks {missing} (official names ctx_pos / ctx_neg); "
            f"keys present: {sorted(sd)[:8]}..."
        )
    deep = sorted(int(k.split(".")[1]) for k in out if k.startswith("deep_prompts."))
    if deep != list(range(len(deep))):
        raise KeyError(f"deep prompts must be numbered 0..n-1, got {deep}")
    return out


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> PromptConfig:
    """Prompt sizes of a state dict in our layout (after :func:`checkpoint_filter_fn`)."""
    ctx = state_dict["ctx_normal"]
    if tuple(state_dict["ctx_abnormal"].shape) != tuple(ctx.shape):
        raise ValueError(
            f"ctx_normal {tuple(ctx.shape)} and ctx_abnormal "
            f"{tuple(state_dict['ctx_abnormal'].shape)} differ in shape"
        )
    deep = [state_dict[f"deep_prompts.{j}"] for j in range(_count_deep(state_dict))]
    shapes = {tuple(p.shape) for p in deep}
    if len(shapes) > 1:
        raise ValueError(f"deep prompts have different shapes: {sorted(shapes)}")
    t_n_ctx = deep[0].shape[0] if deep else 1
    if deep and deep[0].shape[1] != ctx.shape[1]:
        raise ValueError(f"deep prompt width {deep[0].shape[1]} != context width {ctx.shape[1]}")
    return PromptConfig(
        text_width=int(ctx.shape[1]), n_ctx=int(ctx.shape[0]), depth=len(deep) + 1, t_n_ctx=t_n_ctx
    )


def _count_deep(state_dict: Mapping[str, torch.Tensor]) -> int:
    return sum(1 for k in state_dict if _DEEP_OURS.match(k))


def save_prompt_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: PromptConfig,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the prompt learner as safetensors, atomically (layout: ``detectors._checkpoint``)."""
    return save_checkpoint(
        path, state_dict, kind=CHECKPOINT_KIND, config=config.to_dict(), extra=extra
    )


def load_prompt_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read our safetensors file (any layout) or an official ``.pth`` (or its safetensors export).

    ``.pth`` files are read with ``torch.load(weights_only=True)``.

    Returns:
        (state dict in our layout, float32 on the CPU; what the file says about itself).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file or not an AnomalyCLIP prompt learner (the message names it).
    """
    return read_checkpoint_file(
        path, CHECKPOINT_KIND, "AnomalyCLIP prompt-learner checkpoint", checkpoint_filter_fn
    )
