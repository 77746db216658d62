"""AnomalyCLIP building blocks: the object-agnostic prompt learner and pure scoring functions.

The prompt learner holds the only trainable tensors of AnomalyCLIP (Zhou et al., ICLR 2024):
two embedding-level contexts ("[V1..Vn] object." for normal, "[W1..Wn] damaged object." for
abnormal) and the deep text prompts that overwrite token positions 1..t_n_ctx before text blocks
2..depth. The text tower itself is the frozen CLIP of :class:`~anomalens.backbones.clip.ClipBackbone`.

Everything below the module is a pure tensor function (scores, maps), tested on tiny tensors and
against the official-code parity fixtures; the training loss is in ``anomalens.training.losses``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from anomalens.scoring.maps import gaussian_smooth, upsample
from anomalens.scoring.similarity import DEFAULT_TEMPERATURE, image_logits

__all__ = [
    "ABNORMAL_TEMPLATE",
    "NORMAL_TEMPLATE",
    "AnomalyCLIPPromptLearner",
    "PromptConfig",
    "anomaly_map_from_probs",
    "anomalyclip_scores",
    "patch_text_probs",
    "placeholder_prompts",
    "similarity_maps",
]

#: Class-free prompt words after the learnable context (normal, abnormal).
NORMAL_TEMPLATE = "object"
ABNORMAL_TEMPLATE = "damaged object"


@dataclass(frozen=True)
class PromptConfig:
    """Sizes of the prompt learner.

    Attributes:
        text_width: width of the text transformer tokens (``ln_final`` width; 768 for ViT-L/14).
        n_ctx: learnable tokens per prompt at the embedding layer (official 12).
        depth: deep-prompt depth: deep tokens go in before text blocks 2..depth (official 9,
            i.e. ``depth - 1`` = 8 deep-prompt tensors); 1 disables deep prompts.
        t_n_ctx: deep tokens per block, shared by the normal and abnormal prompts (official 4).
    """

    text_width: int
    n_ctx: int = 12
    depth: int = 9
    t_n_ctx: int = 4

    def __post_init__(self) -> None:
        if self.text_width < 1 or self.n_ctx < 1 or self.depth < 1 or self.t_n_ctx < 1:
            raise ValueError(f"all prompt sizes must be >= 1, got {self}")
        if self.t_n_ctx > self.n_ctx:
            raise ValueError(
                f"t_n_ctx={self.t_n_ctx} deep tokens would overwrite the class words: it must be "
                f"<= n_ctx={self.n_ctx}"
            )

    @property
    def num_deep(self) -> int:
        """Number of deep-prompt tensors (``depth - 1``)."""
        return self.depth - 1

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def placeholder_prompts(n_ctx: int) -> tuple[str, str]:
    """The two strings tokenised to build the prompt templates (normal, abnormal).

    ``n_ctx`` placeholder words "X" stand for the learnable tokens; their embeddings are
    replaced, only the token ids (to find the EOT position) and the class-free suffix are used.
    """
    prefix = " ".join(["X"] * n_ctx)
    return f"{prefix} {NORMAL_TEMPLATE}.", f"{prefix} {ABNORMAL_TEMPLATE}."


class AnomalyCLIPPromptLearner(nn.Module):
    """Object-agnostic learnable text prompts (normal, abnormal) with deep text prompts.

    Parameters: ``ctx_normal`` and ``ctx_abnormal`` (n_ctx, W) and ``deep_prompts.j``
    (t_n_ctx, W) for j = 0..depth-2, all initialised N(0, 0.02^2). The frozen template
    (embeddings of SOS and of the suffix, token ids) comes from the backbone via
    :meth:`set_template` and is not part of the state dict.

    Args:
        config: prompt sizes.
        fp16_deep_prompts: round the deep prompts to float16 (and back) when they are used, as
            the official code does even in float32 (required for parity).
    """

    def __init__(self, config: PromptConfig, fp16_deep_prompts: bool = True) -> None:
        super().__init__()
        self.config = config
        self.fp16_deep_prompts = fp16_deep_prompts
        w, n = config.text_width, config.n_ctx
        self.ctx_normal = nn.Parameter(torch.randn(n, w) * 0.02)
        self.ctx_abnormal = nn.Parameter(torch.randn(n, w) * 0.02)
        self.deep_prompts = nn.ParameterList(
            [nn.Parameter(torch.randn(config.t_n_ctx, w) * 0.02) for _ in range(config.num_deep)]
        )
        self.register_buffer("token_prefix", torch.zeros(2, 1, w), persistent=False)
        self.register_buffer("token_suffix", torch.zeros(2, 0, w), persistent=False)
        self.register_buffer("token_ids", torch.zeros(2, 0, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def set_template(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Store the frozen template from the placeholder prompts.

        Args:
            embeddings: (2, C, W) token embeddings of :func:`placeholder_prompts` (normal row 0).
            token_ids: (2, C) their token ids.
        """
        n = self.config.n_ctx
        if (
            embeddings.ndim != 3
            or embeddings.shape[0] != 2
            or embeddings.shape[2] != (self.config.text_width)
        ):
            raise ValueError(
                f"template embeddings must be (2, C, {self.config.text_width}), got "
                f"{tuple(embeddings.shape)}"
            )
        if tuple(token_ids.shape) != tuple(embeddings.shape[:2]):
            raise ValueError(
                f"token_ids {tuple(token_ids.shape)} do not match embeddings "
                f"{tuple(embeddings.shape)}"
            )
        dev = self.ctx_normal.device
        self.token_prefix = embeddings[:, :1].float().to(dev)
        self.token_suffix = embeddings[:, 1 + n :].float().to(dev)
        self.token_ids = token_ids.long().to(dev)

    def has_template(self) -> bool:
        """True once :meth:`set_template` was called."""
        return self.token_ids.shape[1] > 0

    def prompt_embeddings(self) -> torch.Tensor:
        """(2, C, W) input embeddings: ``[SOS, ctx, suffix]`` (row 0 normal, row 1 abnormal)."""
        if not self.has_template():
            raise RuntimeError("AnomalyCLIPPromptLearner.set_template() was not called")
        ctx = torch.stack([self.ctx_normal, self.ctx_abnormal])
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)

    def deep_prompt_list(self) -> list[torch.Tensor]:
        """Deep prompts as the text tower uses them: (t_n_ctx, W) each, fp16-rounded if set."""
        if self.fp16_deep_prompts:
            return [p.half().float() for p in self.deep_prompts]
        return list(self.deep_prompts)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Return (prompt embeddings (2, C, W), token ids (2, C), deep prompts)."""
        return self.prompt_embeddings(), self.token_ids, self.deep_prompt_list()


# ------------------------------------------------------------------------------------------
# Pure scoring functions
# ------------------------------------------------------------------------------------------


def patch_text_probs(
    patch_tokens: torch.Tensor, text: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> torch.Tensor:
    """Per-token softmax over (normal, abnormal) of ``P̂ · t̂ / τ``.

    Args:
        patch_tokens: (B, L, D) tokens (row 0 may be the CLS token; it is kept).
        text: (2, D) text embeddings.
        temperature: τ.

    Returns:
        (B, L, 2) probabilities.
    """
    p = patch_tokens / patch_tokens.norm(dim=-1, keepdim=True)
    t = text / text.norm(dim=-1, keepdim=True)
    return (p @ t.t() / temperature).softmax(dim=-1)


def similarity_maps(
    probs: torch.Tensor, grid_size: tuple[int, int], image_size: int
) -> torch.Tensor:
    """Patch probabilities (CLS row dropped) to image-size maps, bilinear ``align_corners=False``.

    Args:
        probs: (B, 1+N, 2) output of :func:`patch_text_probs`, row 0 = CLS.
        grid_size: (h, w) with h * w = N, row-major.
        image_size: output side S.

    Returns:
        (B, 2, S, S) maps [normal, abnormal].
    """
    b, length, c = probs.shape
    h, w = grid_size
    if length != 1 + h * w:
        raise ValueError(f"probs has {length} rows, expected 1 + {h}*{w} for grid {grid_size}")
    grid = probs[:, 1:].reshape(b, h, w, c).permute(0, 3, 1, 2)
    return upsample(grid, image_size)


def anomaly_map_from_probs(maps: torch.Tensor) -> torch.Tensor:
    """``(S_a + 1 - S_n) / 2`` of (B, 2, S, S) maps -> (B, S, S)."""
    return (maps[:, 1] + 1 - maps[:, 0]) / 2


def anomalyclip_scores(
    patch_tokens: Sequence[torch.Tensor],
    global_embedding: torch.Tensor,
    text: torch.Tensor,
    grid_size: tuple[int, int],
    image_size: int,
    temperature: float = DEFAULT_TEMPERATURE,
    sigma: float = 4.0,
) -> dict[str, torch.Tensor]:
    """AnomalyCLIP scores of encoded images.

    Args:
        patch_tokens: per tapped layer (B, 1+N, D) projected patch tokens (CLS row first).
        global_embedding: (B, D).
        text: (2, D) prompt embeddings [normal, abnormal].
        grid_size: (h, w) patch grid.
        image_size: map side S.
        temperature: τ of every softmax.
        sigma: Gaussian smoothing of the summed map (scipy ``gaussian_filter`` equivalent).

    Returns:
        ``logits`` (B, 2), ``image_score`` (B,) = softmax(logits)[:, 1] (the map plays no part),
        ``layer_probs`` (K, B, 1+N, 2), ``layer_maps`` (K, B, S, S) per-layer maps,
        ``map_sum`` (B, S, S) sum over layers (not averaged), ``anomaly_map`` (B, S, S) smoothed.
    """
    logits = image_logits(global_embedding, text, temperature)
    probs = [patch_text_probs(t, text, temperature) for t in patch_tokens]
    layer_maps = [anomaly_map_from_probs(similarity_maps(p, grid_size, image_size)) for p in probs]
    map_sum = torch.stack(layer_maps).sum(dim=0)
    return {
        "logits": logits,
        "image_score": logits.softmax(dim=-1)[:, 1],
        "layer_probs": torch.stack(probs),
        "layer_maps": torch.stack(layer_maps),
        "map_sum": map_sum,
        "anomaly_map": gaussian_smooth(map_sum, sigma),
    }
