"""Similarity scores between embeddings: cosine, two-class text softmax, nearest-neighbour distance.

Pure tensor functions (no model, no IO); every input may live on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_TEMPERATURE",
    "cosine_similarity",
    "image_logits",
    "nearest_cosine_distance",
    "two_class_anomaly_probability",
]

#: Fixed softmax temperature of the image-text similarities of WinCLIP, AdaptCLIP and
#: AnomalyCLIP (all official 0.07; CLIP's learned logit scale 100 would be 0.01).
DEFAULT_TEMPERATURE = 0.07


def cosine_similarity(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query with every key.

    Args:
        queries: (..., N, D) vectors (any norm).
        keys: (M, D) vectors (any norm).

    Returns:
        (..., N, M) cosine similarities in [-1, 1].
    """
    if queries.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"feature sizes differ: queries (..., {queries.shape[-1]}) vs keys (M, {keys.shape[-1]})"
        )
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    return q @ k.T


def image_logits(
    global_embedding: torch.Tensor,
    text_embeddings: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Cosine logits of images against the two class texts (AdaptCLIP, AnomalyCLIP).

    Computed in the input dtype (differentiable; the training recipes back-propagate through it).

    Args:
        global_embedding: (B, D) image embeddings (any norm).
        text_embeddings: (2, D) normal / abnormal text embeddings (any norm).
        temperature: softmax temperature tau.

    Returns:
        (B, 2) logits ``cos / tau`` [normal, abnormal].
    """
    g = F.normalize(global_embedding, dim=-1)
    t = F.normalize(text_embeddings, dim=-1)
    return g @ t.T / temperature


def two_class_anomaly_probability(
    features: torch.Tensor,
    text_prototypes: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Probability of the anomalous class from a 2-way softmax over text prototypes (WinCLIP Eq. 1).

    ``p = exp(cos(f, t_a) / tau) / (exp(cos(f, t_n) / tau) + exp(cos(f, t_a) / tau))``.

    Args:
        features: (..., D) visual embeddings (any norm).
        text_prototypes: (2, D) rows ``[normal, anomalous]`` (any norm).
        temperature: softmax temperature tau > 0.

    Returns:
        (...) anomalous-class probabilities in [0, 1].
    """
    if text_prototypes.ndim != 2 or text_prototypes.shape[0] != 2:
        raise ValueError(
            f"text_prototypes must be (2, D) [normal, anomalous], got {tuple(text_prototypes.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sims = cosine_similarity(features.unsqueeze(-2), text_prototypes).squeeze(-2)  # (..., 2)
    return torch.softmax(sims / temperature, dim=-1)[..., 1]


def nearest_cosine_distance(
    queries: torch.Tensor, memory: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Halved cosine distance to the nearest memory vector (WinCLIP+ Eq. 4).

    ``A(f) = min_r (1 - cos(f, r)) / 2``, over all memory rows regardless of position.

    Args:
        queries: (..., N, D) query features.
        memory: (M, D) reference features, M >= 1.
        chunk_size: memory rows compared at once (bounds the (..., N, chunk) buffer).

    Returns:
        (..., N) distances in [0, 1].
    """
    if memory.ndim != 2 or memory.shape[0] == 0:
        raise ValueError(f"memory must be a non-empty (M, D) tensor, got {tuple(memory.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    best: torch.Tensor | None = None
    for start in range(0, memory.shape[0], chunk_size):
        sim = cosine_similarity(queries, memory[start : start + chunk_size]).amax(dim=-1)
        best = sim if best is None else torch.maximum(best, sim)
    assert best is not None
    return ((1.0 - best) / 2.0).clamp_(0.0, 1.0)
