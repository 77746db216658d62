"""The tapped CLIP vision tower: patch embedding, per-block taps, the V-V path, windows.

Pure functions over an open_clip ``VisionTransformer`` (no hooks, no state), used by
:class:`~anomalens.backbones.clip_backbone.ClipBackbone`:

* :func:`embed_patches`: patchify, CLS, positions, ``ln_pre``;
* :func:`run_tapped`: the blocks, with copies of the tokens after chosen blocks and the V-V
  ("DPAM" / CLIP-surgery) dual path from a chosen block on (:func:`vv_dual_block`);
* :func:`encode_window_sequences`: WinCLIP's token-dropped window sequences;
* :func:`check_taps`: 1-indexed tap / V-V block numbers validated against the tower's depth.

Block numbers are **1-indexed** (block 1 is the first transformer block), as in the method
papers: ``layers=(6, 12, 18, 24)`` taps the outputs of blocks 6, 12, 18 and 24.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

__all__ = [
    "ClipImageFeatures",
    "ClipImageTokens",
    "check_supported_clip",
    "check_taps",
    "check_vv_blocks",
    "chunks",
    "embed_patches",
    "encode_window_sequences",
    "run_tapped",
    "tap_blocks",
    "vv_dual_block",
]


@dataclass
class ClipImageFeatures:
    """Projected image features of one batch.

    Attributes:
        patch_tokens: one (B, 1+N, D) tensor per requested layer, in the order of ``layers``:
            ``LN_post(tokens) @ proj``; row 0 is the CLS token (consumers drop it). Taken from
            the V-V stream for layers >= ``vv_start``.
        global_embedding: (B, D): original-stream CLS after the last block ``@ proj``, with or
            without ``LN_post`` (``global_ln_post``).
        grid_size: (h, w) patch grid; N = h * w, row-major.
        layers: the 1-indexed block numbers of ``patch_tokens``.
    """

    patch_tokens: list[torch.Tensor]
    global_embedding: torch.Tensor
    grid_size: tuple[int, int]
    layers: tuple[int, ...]


@dataclass
class ClipImageTokens:
    """Unprojected residual-stream tokens of one batch (width W of the vision tower).

    Attributes:
        tokens: one (B, 1+N, W) tensor per requested layer (the V-V stream for layers >=
            ``vv_start``), before ``LN_post`` and projection.
        final: (B, 1+N, W) original stream after the last block.
        grid_size: (h, w) patch grid.
        layers: the 1-indexed block numbers of ``tokens``.
    """

    tokens: list[torch.Tensor]
    final: torch.Tensor
    grid_size: tuple[int, int]
    layers: tuple[int, ...]


def check_supported_clip(model: nn.Module) -> None:
    """Raise unless ``model`` is an open_clip CLIP with a plain CLS-pooled ViT image tower."""
    if not isinstance(model, CLIP):
        raise ValueError(f"ClipBackbone wraps open_clip.CLIP models, got {type(model).__name__}")
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"ClipBackbone needs a ViT image tower, got {type(visual).__name__} (ResNet/timm "
            "towers are not supported)"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError(
            "ClipBackbone needs CLS-token pooling (pool_type='tok', no attentional pooling, "
            "ln_post before pooling)"
        )
    if visual.proj is None:
        raise ValueError("ClipBackbone needs a vision projection (visual.proj)")


def tap_blocks(
    num_blocks: int, layers: Sequence[int], vv_start: int | None = None
) -> tuple[int, ...]:
    """Validate 1-indexed tap blocks (and the first V-V block, if any) against the depth.

    Returns:
        ``layers`` as a tuple of ints (may be empty).

    Raises:
        ValueError: a block outside ``1..num_blocks``.
    """
    out = tuple(int(layer) for layer in layers)
    bad = [layer for layer in out if not 1 <= layer <= num_blocks]
    if bad:
        raise ValueError(f"layers {bad} out of range: blocks are numbered 1..{num_blocks}")
    if vv_start is not None and not 1 <= int(vv_start) <= num_blocks:
        raise ValueError(f"vv_start={vv_start} out of range: blocks are numbered 1..{num_blocks}")
    return out


def check_taps(
    num_blocks: int, layers: Sequence[int], vv_start: int
) -> tuple[tuple[int, ...], int]:
    """Validate a detector's tap layers (at least one) and its first V-V block.

    Returns:
        (layers as a tuple of ints, vv_start as an int).

    Raises:
        ValueError: no layer, or a block outside ``1..num_blocks``.
    """
    if not layers:
        raise ValueError(f"layers must name at least one block in 1..{num_blocks}")
    return tap_blocks(num_blocks, layers, vv_start), int(vv_start)


def chunks(x: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    """Split along dim 0 into pieces of ``size`` (None or >= len: one piece)."""
    if size is None or size >= x.shape[0]:
        return [x]
    if size <= 0:
        raise ValueError(f"batch size must be positive, got {size}")
    return list(torch.split(x, size))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, W) -> (B, H, L, W/H)."""
    b, n, w = x.shape
    return x.reshape(b, n, heads, w // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def vv_dual_block(
    block: ResidualAttentionBlock, o: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One transformer block of the V-V dual path (clip_backbone.md section 4).

    With ``h = LN1(o)`` and the block's fused in-projection ``[Q, K, V] = h W_in^T + b_in``:
    ``Y_o = OutProj(softmax(Q K^T s) V)``, ``Y_v = OutProj(softmax(V V^T s) V)`` per head with
    ``s = d^-1/2``; then ``o <- o + ls_1(Y_o); o <- o + ls_2(MLP(LN2 o))`` (an ordinary block) and
    ``v <- v + ls_1(Y_v)`` (no MLP). ``Y_v`` is computed from ``LN1(o)``, never from ``v``.

    Args:
        block: an open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` inside).
        o: (B, L, W) original stream.
        v: (B, L, W) V-V stream.

    Returns:
        The new ``(o, v)``, both (B, L, W); the inputs are not modified.
    """
    attn = block.attn
    heads = attn.num_heads
    h = block.ln_1(o)
    q, k, val = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, val = (_split_heads(t, heads) for t in (q, k, val))
    b = o.shape[0]
    # one attention call for both paths: queries (Q | V), keys (K | V), values (V | V)
    y = F.scaled_dot_product_attention(
        torch.cat([q, val]), torch.cat([k, val]), torch.cat([val, val])
    )
    y = F.linear(_merge_heads(y), attn.out_proj.weight, attn.out_proj.bias)
    y_o, y_v = y[:b], y[b:]
    o = o + block.ls_1(y_o)
    o = o + block.ls_2(block.mlp(block.ln_2(o)))
    v = v + block.ls_1(y_v)
    return o, v


def check_vv_blocks(visual: VisionTransformer, vv_start: int) -> None:
    """Raise unless the blocks from ``vv_start`` on are open_clip ``ResidualAttentionBlock``s."""
    blocks = visual.transformer.resblocks[vv_start - 1 :]
    if not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
        raise ValueError("the V-V path needs open_clip ResidualAttentionBlock blocks")


def embed_patches(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Patchify, prepend CLS, add positions, ``ln_pre``.

    Args:
        visual: the vision tower (its current positional embedding fixes the grid).
        x: (B, 3, S, S) in the tower's dtype and device.

    Returns:
        (B, 1+N, W) tokens.
    """
    x = visual.conv1(x).flatten(2).transpose(1, 2)
    cls_tok = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls_tok, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)


def run_tapped(
    visual: VisionTransformer, x: torch.Tensor, layers: tuple[int, ...], vv_start: int | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run the tower on one batch, keeping copies of the tokens after the tapped blocks.

    Blocks ``< vv_start`` run normally; from ``vv_start`` on the original stream ``o`` and the
    V-V stream ``v`` (starting equal to the input of block ``vv_start``) run side by side
    (:func:`vv_dual_block`). The tap of block ``l`` is ``v`` if ``l >= vv_start``, else ``o``.

    Args:
        visual: the vision tower.
        x: (B, 3, S, S) in the tower's dtype and device.
        layers: validated 1-indexed blocks (:func:`tap_blocks`).
        vv_start: first block of the V-V path, or None for plain CLIP.

    Returns:
        (one (B, 1+N, W) copy per entry of ``layers``, the (B, 1+N, W) original stream after
        the last block), in the tower's dtype.
    """
    o = embed_patches(visual, x)
    v: torch.Tensor | None = None
    taps: dict[int, torch.Tensor] = {}
    wanted = set(layers)
    for i, block in enumerate(visual.transformer.resblocks, start=1):
        if vv_start is not None and i >= vv_start:
            o, v = vv_dual_block(block, o, o if v is None else v)
        else:
            o = block(o)
        if i in wanted:
            taps[i] = (v if v is not None else o).clone()
    return [taps[layer] for layer in layers], o


def encode_window_sequences(
    visual: VisionTransformer, x: torch.Tensor, index_sets: torch.Tensor, max_sequences: int
) -> torch.Tensor:
    """WinCLIP window embeddings: CLS embedding of token-dropped sequences.

    For every image and window, the sequence ``[CLS] + patch tokens of the window`` (each token
    keeps the positional embedding of its grid position, after ``ln_pre``) runs through all
    blocks; the CLS output goes through ``LN_post`` and ``proj``.

    Args:
        visual: the vision tower.
        x: (B, 3, S, S) in the tower's dtype and device.
        index_sets: (M, n) long patch indices in [0, N), row-major over the grid (validated by
            the caller).
        max_sequences: sequences (image x window) per forward chunk.

    Returns:
        (B, M, D) float32 window embeddings (not normalised).
    """
    emb = embed_patches(visual, x)  # (B, 1+N, W)
    b, _, width = emb.shape
    m, n = index_sets.shape
    win = emb[:, 1:][:, index_sets.to(emb.device)]  # (B, M, n, W)
    cls_tok = emb[:, :1].unsqueeze(1).expand(b, m, 1, width)
    seq = torch.cat([cls_tok, win], dim=2).reshape(b * m, 1 + n, width)
    outs: list[torch.Tensor] = []
    for chunk in chunks(seq, max_sequences):
        for block in visual.transformer.resblocks:
            chunk = block(chunk)
        outs.append((visual.ln_post(chunk[:, 0]) @ visual.proj).float())
    return torch.cat(outs).reshape(b, m, -1)
