"""The CLIP text tower: token ids or learnable prompt embeddings (with deep prompts) to embeddings.

Pure functions over an open_clip ``CLIP`` used by
:class:`~anomalens.backbones.clip_backbone.ClipBackbone`: :func:`text_forward` runs positions,
the causal blocks (optionally overwriting sequence positions with AnomalyCLIP's deep prompts),
``ln_final``, the EOT pooling and the text projection; :func:`check_prompt_inputs` validates the
shapes of learnable prompts before they reach it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn

__all__ = ["check_prompt_inputs", "text_forward"]


def check_prompt_inputs(
    prompt_embeddings: torch.Tensor,
    token_ids: torch.Tensor,
    deep_prompts: Sequence[torch.Tensor] | None,
    *,
    context_length: int,
    text_width: int,
    num_text_layers: int,
) -> None:
    """Validate learnable prompt inputs against the text tower.

    Args:
        prompt_embeddings: should be (T, context_length, text_width).
        token_ids: should be (T, context_length).
        deep_prompts: each should be (n_j, text_width) with 1 <= n_j < context_length; at most
            ``num_text_layers - 1`` of them.
        context_length, text_width, num_text_layers: the text tower's sizes.

    Raises:
        ValueError: a shape or count that does not fit, naming the expected one.
    """
    t, c, w = prompt_embeddings.shape
    if c != context_length or w != text_width:
        raise ValueError(
            f"prompt_embeddings must be (T, {context_length}, {text_width}), "
            f"got {tuple(prompt_embeddings.shape)}"
        )
    if tuple(token_ids.shape) != (t, c):
        raise ValueError(
            f"token_ids must be ({t}, {c}) to match prompt_embeddings, got {tuple(token_ids.shape)}"
        )
    if deep_prompts is None:
        return
    if len(deep_prompts) > num_text_layers - 1:
        raise ValueError(
            f"{len(deep_prompts)} deep prompts but the text tower has only "
            f"{num_text_layers} blocks (at most {num_text_layers - 1} allowed)"
        )
    for j, p in enumerate(deep_prompts):
        if p.ndim != 2 or p.shape[1] != w or not 1 <= p.shape[0] < c:
            raise ValueError(
                f"deep_prompts[{j}] must be (n, {w}) with 1 <= n < {c}, got {tuple(p.shape)}"
            )


def text_forward(
    model: CLIP,
    x: torch.Tensor,
    token_ids: torch.Tensor,
    deep_prompts: Sequence[torch.Tensor] | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Input token embeddings to text embeddings, as open_clip ``encode_text`` (no normalising).

    Deep prompt ``j`` (n_j, W_text) overwrites sequence positions ``1..n_j`` of every prompt
    before text block ``j + 2`` (1-indexed), i.e. for blocks ``2 .. len(deep_prompts) + 1``.

    Args:
        model: the open_clip model (its text tower is used).
        x: (T, C, W_text) token embeddings, before the positional embedding.
        token_ids: (T, C) long ids; only their argmax (EOT) position is used for pooling.
        deep_prompts: AnomalyCLIP deep prompts, or None.
        dtype: the model's dtype (the computation runs in it).

    Returns:
        (T, D) float32.
    """
    m = model
    x = x.to(dtype) + m.positional_embedding.to(dtype)
    mask = m.attn_mask.to(device=x.device, dtype=x.dtype) if m.attn_mask is not None else None
    for i, block in enumerate(m.transformer.resblocks, start=1):
        if deep_prompts is not None and 2 <= i <= len(deep_prompts) + 1:
            p = deep_prompts[i - 2].to(device=x.device, dtype=x.dtype)
            n = p.shape[0]
            x = torch.cat([x[:, :1], p.unsqueeze(0).expand(x.shape[0], n, -1), x[:, 1 + n :]], 1)
        x = block(x, attn_mask=mask)
    x = m.ln_final(x)
    x = text_global_pool(x, token_ids, m.text_pool_type, eos_token_id=m.text_eos_id)
    proj = m.text_projection
    x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x.float()
