"""Turn prompt ensembles into text prototypes with a CLIP text encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from anomalens.prompts.templates import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    PAPER_TEMPLATES,
    compositional_prompts,
)

__all__ = ["PrototypeAveraging", "TextEncoder", "encode_prompt_ensemble", "winclip_text_prototypes"]

PrototypeAveraging = Literal["raw", "normalized"]


class TextEncoder(Protocol):
    """Anything with CLIP's ``encode_text(list[str]) -> (T, D)`` (e.g. ``ClipBackbone``)."""

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor: ...


def encode_prompt_ensemble(
    encoder: TextEncoder,
    prompts: Sequence[str],
    average: PrototypeAveraging = "raw",
    batch_size: int = 128,
) -> torch.Tensor:
    """Mean text embedding of a list of prompts, L2-normalised.

    Args:
        encoder: text encoder returning projected, un-normalised embeddings (T, D).
        prompts: prompt strings (T >= 1).
        average: ``"raw"`` averages the embeddings as returned (WinCLIP re-implementations);
            ``"normalized"`` L2-normalises each one first (CLIP's zero-shot ensembling).
        batch_size: prompts encoded per call.

    Returns:
        (D,) unit-norm prototype, float32.
    """
    if not prompts:
        raise ValueError("encode_prompt_ensemble got no prompt")
    if average not in ("raw", "normalized"):
        raise ValueError(f"average must be 'raw' or 'normalized', got {average!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total: torch.Tensor | None = None
    for start in range(0, len(prompts), batch_size):
        emb = encoder.encode_text(list(prompts[start : start + batch_size])).float()
        if average == "normalized":
            emb = F.normalize(emb, dim=-1)
        part = emb.sum(dim=0)
        total = part if total is None else total + part
    assert total is not None
    return F.normalize(total / len(prompts), dim=-1)


def winclip_text_prototypes(
    encoder: TextEncoder,
    object_name: str,
    templates: Sequence[str] = PAPER_TEMPLATES,
    normal_states: Sequence[str] = NORMAL_STATES,
    anomalous_states: Sequence[str] = ANOMALOUS_STATES,
    average: PrototypeAveraging = "raw",
) -> torch.Tensor:
    """WinCLIP's normal and anomalous text prototypes from the compositional prompt ensemble.

    Args:
        encoder: CLIP text encoder.
        object_name: object word(s) inserted into the state phrases, e.g. ``"metal nut"``.
        templates: templates with one ``{}`` for the state phrase.
        normal_states: normal state phrases with one ``{}`` for the object name.
        anomalous_states: anomalous state phrases.
        average: see ``encode_prompt_ensemble``.

    Returns:
        (2, D) unit-norm rows ``[normal, anomalous]``.
    """
    normal = compositional_prompts(object_name, tuple(normal_states), tuple(templates))
    anomalous = compositional_prompts(object_name, tuple(anomalous_states), tuple(templates))
    return torch.stack(
        [
            encode_prompt_ensemble(encoder, normal, average),
            encode_prompt_ensemble(encoder, anomalous, average),
        ]
    )
