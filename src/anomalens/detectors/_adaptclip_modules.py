"""AdaptCLIP building blocks: the three adapters and the scoring / fusion functions.

Modules (learnable, small):

* ``TextualAdapter`` (TA): two sets of ``n_ctx`` learned prompt-token embeddings (normal,
  abnormal) spliced into a placeholder sentence at the text encoder's input.
* ``VisualAdapter`` (VA): two residual bottleneck MLPs, one for the global embedding and one for
  the last layer's patch tokens.
* ``PromptQueryAdapter`` (PQA): per-layer BatchNorm on ``q + |q - nearest normal patch|``, then one
  local head (2-channel map) and one global head (2 logits), both shared by all layers.

Pure tensor functions (no state): probability maps, nearest-normal alignment, zero- and few-shot
fusion. The shared pieces live in ``anomalens.scoring``: ``image_logits`` and the temperature
(``similarity``), ``harmonic_mean`` (``aggregate``), ``upsample`` and ``gaussian_smooth`` (``maps``;
equal to scipy's ``gaussian_filter`` with its ``reflect`` border).
Channel / column 0 is always *normal*, 1 *abnormal*.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.scoring.aggregate import harmonic_mean
from anomalens.scoring.maps import gaussian_smooth, upsample
from anomalens.scoring.similarity import DEFAULT_TEMPERATURE, image_logits

__all__ = [
    "ALIGN_CHUNK_ELEMENTS",
    "AdaptCLIPAdapters",
    "AdaptCLIPHeads",
    "AdapterConfig",
    "FusionType",
    "PromptQueryAdapter",
    "PromptQueryHeads",
    "ResidualBottleneck",
    "TextualAdapter",
    "VisualAdapter",
    "adaptclip_heads",
    "align_to_memory",
    "fuse_few_shot",
    "fuse_zero_shot",
    "patch_probability_maps",
    "pqa_image_vector",
    "three_way_mean",
]

#: Largest (B, n, M) similarity block of one ``align_to_memory`` chunk (2**24 floats = 64 MiB).
ALIGN_CHUNK_ELEMENTS = 2**24

FusionType = Literal["average_mean", "harmonic_mean"]
SmoothFn = Callable[[torch.Tensor, float], torch.Tensor]


# =============================================================================== configuration
@dataclass(frozen=True)
class AdapterConfig:
    """Sizes of the three adapters.

    Attributes:
        embed_dim: joint CLIP embedding size D (768 for ViT-L/14@336, 640 for ViT-B-16+240).
        text_width: width of the text tokens (the TA context lives in this space).
        n_ctx: number of learned prompt tokens per class.
        context_length: text context length (77).
        reduction: VA bottleneck reduction (D -> D / reduction -> D).
        mid_dim: PQA hidden width (local head: D -> mid -> mid/2 -> 2; global head likewise).
        num_layers: number of tapped image layers fed to the PQA (one BatchNorm each).
        topk: number of top spatial values averaged into the PQA image vector.
    """

    embed_dim: int = 768
    text_width: int = 768
    n_ctx: int = 12
    context_length: int = 77
    reduction: int = 4
    mid_dim: int = 128
    num_layers: int = 4
    topk: int = 10

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# ====================================================================================== modules
class TextualAdapter(nn.Module):
    """Learned prompt tokens for the normal and the abnormal text prompt.

    Buffers ``token_prefix`` (2, 1, W), ``token_suffix`` (2, L - 1 - n_ctx, W) and
    ``token_ids`` (2, L) hold the frozen embedding of the placeholder sentence (SOS; period, EOS,
    padding) and its token ids; they are set with :meth:`set_placeholder` (or loaded from a
    checkpoint). Row 0 is the normal prompt, row 1 the abnormal one.
    """

    token_prefix: torch.Tensor
    token_suffix: torch.Tensor
    token_ids: torch.Tensor

    def __init__(self, text_width: int, n_ctx: int = 12, context_length: int = 77) -> None:
        super().__init__()
        self.n_ctx = n_ctx
        self.ctx_normal = nn.Parameter(torch.empty(n_ctx, text_width))
        self.ctx_abnormal = nn.Parameter(torch.empty(n_ctx, text_width))
        nn.init.normal_(self.ctx_normal, std=0.02)
        nn.init.normal_(self.ctx_abnormal, std=0.02)
        self.register_buffer("token_prefix", torch.zeros(2, 1, text_width))
        self.register_buffer("token_suffix", torch.zeros(2, context_length - 1 - n_ctx, text_width))
        self.register_buffer("token_ids", torch.zeros(2, context_length, dtype=torch.long))

    @torch.no_grad()
    def set_placeholder(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Store the frozen parts of the placeholder prompt.

        Args:
            embeddings: (L, W) or (2, L, W) token embeddings of the placeholder sentence.
            token_ids: (L,) or (2, L) its token ids.
        """
        if embeddings.ndim == 2:
            embeddings = embeddings[None].expand(2, -1, -1)
        if token_ids.ndim == 1:
            token_ids = token_ids[None].expand(2, -1)
        n = self.n_ctx
        self.token_prefix.copy_(embeddings[:, :1])
        self.token_suffix.copy_(embeddings[:, 1 + n :])
        self.token_ids.copy_(token_ids)

    def prompt_embeddings(self) -> torch.Tensor:
        """(2, L, W) input embeddings [SOS, ctx_1..ctx_n, rest]; row 0 normal, row 1 abnormal."""
        ctx = torch.stack([self.ctx_normal, self.ctx_abnormal]).to(self.token_prefix.dtype)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


class ResidualBottleneck(nn.Module):
    """``x + W2 ReLU(BN(W1 x))`` on the last dimension (both linears without bias).

    Any leading dimensions are flattened to rows for the BatchNorm.
    """

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = dim // reduction
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        rows = x.reshape(-1, x.shape[-1])
        out = rows + self.fc2(F.relu(self.bn(self.fc1(rows))))
        return out.reshape(x.shape)


class VisualAdapter(nn.Module):
    """Residual bottlenecks for the global embedding and the patch tokens (not shared)."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        self.global_adapter = ResidualBottleneck(dim, reduction)
        self.local_adapter = ResidualBottleneck(dim, reduction)

    def forward(
        self, global_embedding: torch.Tensor, patch_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapt global (B, D) and patch tokens (B, 1+N, D), CLS row included."""
        return self.global_adapter(global_embedding), self.local_adapter(patch_tokens)


class _LocalHead(nn.Module):
    """(B, D, h, w) -> (B, 2, 4h, 4w) logits: two conv-BN-ReLU stages, each followed by a x2
    transposed convolution, then a 1x1 classifier."""

    def __init__(self, dim: int, mid_dim: int) -> None:
        super().__init__()
        half = mid_dim // 2
        self.conv1 = nn.Conv2d(dim, mid_dim, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_dim)
        self.up1 = nn.ConvTranspose2d(mid_dim, mid_dim, 2, stride=2)
        self.conv2 = nn.Conv2d(mid_dim, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.up2 = nn.ConvTranspose2d(half, half, 2, stride=2)
        self.classifier = nn.Conv2d(half, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up1(F.relu(self.bn1(self.conv1(x))))
        x = self.up2(F.relu(self.bn2(self.conv2(x))))
        return self.classifier(x)


class _GlobalHead(nn.Module):
    """(B, D) -> (B, 2) logits: two Linear-BN-ReLU stages (no bias) and a linear classifier."""

    def __init__(self, dim: int, mid_dim: int) -> None:
        super().__init__()
        half = mid_dim // 2
        self.fc1 = nn.Linear(dim, mid_dim, bias=False)
        self.bn1 = nn.BatchNorm1d(mid_dim)
        self.fc2 = nn.Linear(mid_dim, half, bias=False)
        self.bn2 = nn.BatchNorm1d(half)
        self.classifier = nn.Linear(half, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.classifier(x)


class PromptQueryAdapter(nn.Module):
    """Few-shot head on query patches aligned to their nearest normal prompt patch.

    Args:
        dim: token size D.
        mid_dim: hidden width of both heads.
        num_layers: number of tapped layers (one BatchNorm2d each; heads are shared).
        context: fused feature ``q + |q - p*|`` (True, official) or ``|q - p*|`` (False).
        topk: spatial top-k averaged into the image vector.
    """

    def __init__(
        self,
        dim: int,
        mid_dim: int = 128,
        num_layers: int = 4,
        context: bool = True,
        topk: int = 10,
    ) -> None:
        super().__init__()
        self.context = context
        self.topk = topk
        self.layer_norms = nn.ModuleList([nn.BatchNorm2d(dim) for _ in range(num_layers)])
        self.local_head = _LocalHead(dim, mid_dim)
        self.global_head = _GlobalHead(dim, mid_dim)

    def forward(
        self,
        query_tokens: list[torch.Tensor],
        memory: list[torch.Tensor],
        grid_size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """Run all layers.

        Args:
            query_tokens: per layer (B, 1+N, D) query patch tokens (CLS row first).
            memory: per layer L2-normalised normal patch tokens, (M, D) shared by the batch or
                (B, M, D) one memory per query (CLS rows already removed).
            grid_size: (h, w) with h * w = N.

        Returns:
            dict with ``logits`` (B, L, 2), ``map_logits`` (B, L, 2, 4h, 4w) (before softmax),
            ``align`` (B, L, h, w) nearest cosine distances, ``image_vector`` (B, L, D).
        """
        if len(query_tokens) != len(self.layer_norms) or len(memory) != len(self.layer_norms):
            raise ValueError(
                f"PQA was built for {len(self.layer_norms)} layers, got {len(query_tokens)} "
                f"query and {len(memory)} memory layers"
            )
        h, w = grid_size
        feats, aligns = [], []
        for layer, (tokens, mem) in enumerate(zip(query_tokens, memory)):
            q = F.normalize(tokens[:, 1:], dim=-1)
            dist, nearest = align_to_memory(q, mem)
            residual = (q - nearest).abs()
            fused = q + residual if self.context else residual
            b, n, d = fused.shape
            if n != h * w:
                raise ValueError(f"{n} patch tokens do not fill a {h}x{w} grid")
            grid = fused.transpose(1, 2).reshape(b, d, h, w)
            feats.append(self.layer_norms[layer](grid))
            aligns.append(dist.reshape(b, h, w))
        if self.training:
            # per layer, as the shared heads' BatchNorms then see one layer per batch
            map_logits = torch.stack([self.local_head(f) for f in feats], dim=1)
            vectors = torch.stack([pqa_image_vector(f, self.topk) for f in feats], dim=1)
            logits = torch.stack([self.global_head(v) for v in vectors.unbind(1)], dim=1)
        else:
            num = len(feats)
            stacked = torch.cat(feats, dim=0)  # (L*B, D, h, w), eval-mode BN is per sample
            b = feats[0].shape[0]
            map_logits = self.local_head(stacked).reshape(num, b, 2, 4 * h, 4 * w).transpose(0, 1)
            vec = pqa_image_vector(stacked, self.topk)
            logits = self.global_head(vec).reshape(num, b, 2).transpose(0, 1)
            vectors = vec.reshape(num, b, -1).transpose(0, 1)
        return {
            "logits": logits,
            "map_logits": map_logits,
            "align": torch.stack(aligns, dim=1),
            "image_vector": vectors,
        }


class AdaptCLIPAdapters(nn.Module):
    """The three adapters together: ``textual`` (TA), ``visual`` (VA), ``prompt_query`` (PQA)."""

    def __init__(self, config: AdapterConfig, pq_context: bool = True) -> None:
        super().__init__()
        self.config = config
        self.textual = TextualAdapter(config.text_width, config.n_ctx, config.context_length)
        self.visual = VisualAdapter(config.embed_dim, config.reduction)
        self.prompt_query = PromptQueryAdapter(
            config.embed_dim, config.mid_dim, config.num_layers, pq_context, config.topk
        )

    def num_parameters(self) -> dict[str, int]:
        """Learnable parameter counts per adapter (shared heads counted once)."""
        return {
            name: sum(p.numel() for p in getattr(self, name).parameters())
            for name in ("textual", "visual", "prompt_query")
        }


# ============================================================================= pure functions
def patch_probability_maps(
    patch_tokens: torch.Tensor,
    text_embeddings: torch.Tensor,
    grid_size: tuple[int, int],
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Per-patch two-class probabilities.

    Args:
        patch_tokens: (B, 1+N, D) tokens, CLS row first (dropped here).
        text_embeddings: (2, D) normal / abnormal text embeddings.
        grid_size: (h, w), h * w = N.

    Returns:
        (B, 2, h, w) softmax over [normal, abnormal] of ``cos / temperature``.
    """
    p = F.normalize(patch_tokens, dim=-1)
    t = F.normalize(text_embeddings, dim=-1)
    prob = (p @ t.T / temperature).softmax(dim=-1)[:, 1:]
    b = prob.shape[0]
    return prob.transpose(1, 2).reshape(b, 2, *grid_size)


def align_to_memory(
    queries: torch.Tensor, memory: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest normal patch of every query patch, by cosine distance.

    The (B, n, M) similarity block is computed over chunks of ``n`` query patches, so the
    peak memory is bounded whatever the number of shots; every query row is computed exactly
    as without chunking (same result).

    Args:
        queries: (B, N, D) L2-normalised query patches.
        memory: (M, D) or (B, M, D) L2-normalised normal patches.
        chunk_size: query patches per chunk; None picks the largest chunk whose similarity
            block has at most ``ALIGN_CHUNK_ELEMENTS`` entries.

    Returns:
        distances (B, N) = ``min_j (1 - q_i . p_j)`` and the nearest patches (B, N, D).
    """
    if memory.ndim not in (2, 3):
        raise ValueError(f"memory must be (M, D) or (B, M, D), got {tuple(memory.shape)}")
    b, n, d = queries.shape
    m = memory.shape[-2]
    if chunk_size is None:
        chunk_size = max(1, ALIGN_CHUNK_ELEMENTS // max(1, b * m))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mem_t = memory.transpose(-1, -2)
    dists, nearest = [], []
    for start in range(0, n, chunk_size):
        q = queries[:, start : start + chunk_size]
        dist, idx = (1.0 - q @ mem_t).min(dim=-1)  # (B, n_chunk)
        if memory.ndim == 2:
            near = memory[idx]
        else:
            near = torch.gather(memory, 1, idx[..., None].expand(-1, -1, d))
        dists.append(dist)
        nearest.append(near)
    if len(dists) == 1:
        return dists[0], nearest[0]
    return torch.cat(dists, dim=1), torch.cat(nearest, dim=1)


def pqa_image_vector(features: torch.Tensor, topk: int = 10) -> torch.Tensor:
    """Image vector of the PQA global head: ``(spatial mean + mean of the top-k values) / 2``.

    Args:
        features: (B, D, h, w) per-layer BatchNorm output.

    Returns:
        (B, D).
    """
    flat = features.flatten(2)
    k = min(topk, flat.shape[-1])
    return 0.5 * (flat.mean(dim=-1) + flat.topk(k, dim=-1).values.mean(dim=-1))


def three_way_mean(values: torch.Tensor, fusion: FusionType = "average_mean") -> torch.Tensor:
    """Combine the per-head values stacked on dim 0 (arithmetic or harmonic mean)."""
    if fusion == "average_mean":
        return values.mean(dim=0)
    if fusion == "harmonic_mean":
        return harmonic_mean(values, dim=0)
    raise ValueError(f"unknown fusion {fusion!r}; expected 'average_mean' or 'harmonic_mean'")


def fuse_zero_shot(
    va_map: torch.Tensor,
    ta_map: torch.Tensor,
    va_score: torch.Tensor,
    ta_score: torch.Tensor,
    sigma: float = 4.0,
    smooth: SmoothFn | None = None,
) -> dict[str, torch.Tensor]:
    """Zero-shot fusion: ``map = Gauss(mean(VA, TA))``, ``score = mean(p_VA, p_TA, max map)``.

    Args:
        va_map, ta_map: (B, S, S) abnormal-channel maps.
        va_score, ta_score: (B,) abnormal probabilities.
        sigma: Gaussian sigma in pixels.
        smooth: optional ``(maps, sigma) -> maps`` replacing the default smoothing.

    Returns:
        dict with ``fused`` (before smoothing), ``anomaly_map`` (B, S, S), ``map_max`` (B,),
        ``image_score`` (B,); non-finite values of the outputs replaced by 0.
    """
    smooth = smooth or gaussian_smooth
    fused = torch.stack([va_map, ta_map]).mean(dim=0)
    smoothed = smooth(fused, sigma)
    peak = smoothed.flatten(1).amax(dim=1)
    score = torch.stack([va_score, ta_score, peak]).mean(dim=0)
    return {
        "fused": fused,
        "anomaly_map": torch.nan_to_num(smoothed, nan=0.0, posinf=0.0, neginf=0.0),
        "map_max": peak,
        "image_score": torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0),
    }


def fuse_few_shot(
    va_map: torch.Tensor,
    ta_map: torch.Tensor,
    pq_maps: torch.Tensor,
    align_maps: torch.Tensor,
    va_score: torch.Tensor,
    ta_score: torch.Tensor,
    pq_scores: torch.Tensor,
    sigma: float = 4.0,
    fusion: FusionType = "average_mean",
    smooth: SmoothFn | None = None,
) -> dict[str, torch.Tensor]:
    """Few-shot fusion.

    ``M_PQ = mean_l pq_maps``, ``A = HM_l align_maps``,
    ``map = Gauss(HM(fuse3(VA, TA, M_PQ), A))``,
    ``score = HM(fuse3(p_VA, p_TA, mean_l p_PQ_l), max map)``; fuse3 is ``fusion``.

    Args:
        va_map, ta_map: (B, S, S) abnormal-channel maps.
        pq_maps: (B, L, S, S) abnormal channel of each layer's PQA map.
        align_maps: (B, L, S, S) per-layer align (nearest cosine distance) maps, upsampled.
        va_score, ta_score: (B,); pq_scores: (B, L) abnormal probabilities.

    Returns:
        dict with ``pq_map`` (B, S, S), ``align_hm`` (B, S, S), ``avg3`` (B, S, S),
        ``image_avg3`` (B,), ``fused`` (B, S, S) before smoothing, ``anomaly_map``,
        ``map_max`` (B,), ``image_score`` (B,).
    """
    smooth = smooth or gaussian_smooth
    pq_map = pq_maps.mean(dim=1)
    align = harmonic_mean(align_maps, dim=1)
    avg3 = three_way_mean(torch.stack([va_map, ta_map, pq_map]), fusion)
    fused = harmonic_mean([avg3, align])
    smoothed = smooth(fused, sigma)
    peak = smoothed.flatten(1).amax(dim=1)
    image_avg3 = three_way_mean(torch.stack([va_score, ta_score, pq_scores.mean(dim=1)]), fusion)
    score = harmonic_mean([image_avg3, peak])
    return {
        "pq_map": pq_map,
        "align_hm": align,
        "avg3": avg3,
        "image_avg3": image_avg3,
        "fused": fused,
        "anomaly_map": torch.nan_to_num(smoothed, nan=0.0, posinf=0.0, neginf=0.0),
        "map_max": peak,
        "image_score": torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0),
    }


# ================================================================================ all heads
@dataclass(frozen=True)
class PromptQueryHeads:
    """Outputs of the prompt-query adapter (few-shot only), L = tapped layers.

    Attributes:
        logits: (B, L, 2) image logits per layer.
        maps: (B, L, 2, S, S) probability maps per layer (softmax, then upsampled).
        align_lowres: (B, L, h, w) nearest-normal cosine distances at token resolution.
        align: (B, L, S, S) the same, upsampled.
        image_vector: (B, L, D) input of the global head.
    """

    logits: torch.Tensor
    maps: torch.Tensor
    align_lowres: torch.Tensor
    align: torch.Tensor
    image_vector: torch.Tensor


@dataclass(frozen=True)
class AdaptCLIPHeads:
    """Logits and 2-channel probability maps of every AdaptCLIP head (channel 0 normal).

    Attributes:
        va_logits, ta_logits: (B, 2) image logits of the visual / textual adapter.
        va_map_lowres, ta_map_lowres: (B, 2, h, w) maps at token resolution.
        va_map, ta_map: (B, 2, S, S) the same, upsampled.
        pq: prompt-query outputs, or None in zero-shot mode (no memory).
    """

    va_logits: torch.Tensor
    ta_logits: torch.Tensor
    va_map_lowres: torch.Tensor
    ta_map_lowres: torch.Tensor
    va_map: torch.Tensor
    ta_map: torch.Tensor
    pq: PromptQueryHeads | None = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{name: tensor}``: the VA/TA fields by name; with ``pq``, also ``pq_logits``,
        ``pq_maps``, ``align_lowres``, ``align`` and ``pq_image_vector``."""
        out = {
            "va_logits": self.va_logits,
            "ta_logits": self.ta_logits,
            "va_map_lowres": self.va_map_lowres,
            "ta_map_lowres": self.ta_map_lowres,
            "va_map": self.va_map,
            "ta_map": self.ta_map,
        }
        if self.pq is not None:
            out.update(
                pq_logits=self.pq.logits,
                pq_maps=self.pq.maps,
                align_lowres=self.pq.align_lowres,
                align=self.pq.align,
                pq_image_vector=self.pq.image_vector,
            )
        return out


def adaptclip_heads(
    adapters: AdaptCLIPAdapters,
    patch_tokens: list[torch.Tensor],
    global_embedding: torch.Tensor,
    grid_size: tuple[int, int],
    image_size: int,
    static_text: torch.Tensor,
    ta_text: torch.Tensor,
    memory: list[torch.Tensor] | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> AdaptCLIPHeads:
    """Logits and 2-channel probability maps of every AdaptCLIP head (differentiable).

    VA scores the adapted global embedding / last-layer tokens against the static anchors; TA
    scores the raw ones against the learned prompts; the PQA (only with ``memory``) runs on all
    layers. Maps are softmaxed at token resolution, then bilinearly upsampled.

    Args:
        adapters: the three adapters.
        patch_tokens: per tapped layer (B, 1+N, D), CLS row first; the last one feeds VA and TA.
        global_embedding: (B, D) raw image embedding.
        grid_size: (h, w) patch grid.
        image_size: S, side of the output maps.
        static_text: (2, D) VA anchors (normal, abnormal).
        ta_text: (2, D) TA text embeddings (normal, abnormal).
        memory: per layer the normal patches (M, D) or (B, M, D), L2-normalised, or None.

    Returns:
        :class:`AdaptCLIPHeads` (``pq`` set only with ``memory``).
    """
    last = patch_tokens[-1]
    g_va, p_va = adapters.visual(global_embedding, last)
    va_low = patch_probability_maps(p_va, static_text, grid_size, temperature)
    ta_low = patch_probability_maps(last, ta_text, grid_size, temperature)
    pq_heads = None
    if memory is not None:
        pq = adapters.prompt_query(patch_tokens, memory, grid_size)
        b, num, c, h, w = pq["map_logits"].shape
        # softmax before merging (b, num): the reshape -> transpose -> reshape chain it would
        # otherwise end is taken by OpenVINO for a channel shuffle, whose fusion pass fails on a
        # dynamic batch axis; the values are the same
        probs = pq["map_logits"].softmax(dim=2).reshape(b * num, c, h, w)
        pq_heads = PromptQueryHeads(
            logits=pq["logits"],
            maps=upsample(probs, image_size).reshape(b, num, c, image_size, image_size),
            align_lowres=pq["align"],
            align=upsample(pq["align"], image_size),
            image_vector=pq["image_vector"],
        )
    return AdaptCLIPHeads(
        va_logits=image_logits(g_va, static_text, temperature),
        ta_logits=image_logits(global_embedding, ta_text, temperature),
        va_map_lowres=va_low,
        ta_map_lowres=ta_low,
        va_map=upsample(va_low, image_size),
        ta_map=upsample(ta_low, image_size),
        pq=pq_heads,
    )
