"""AdaptCLIP training recipe: all three adapters on an auxiliary dataset, CLIP frozen.

Follows the official recipe (method spec section 6): queries are all images of the auxiliary
dataset's **test** split (normal and anomalous, with masks), all categories mixed and shuffled;
each query gets one normal prompt image drawn at random from its own category's **train** split
at every visit (K = 1). One Adam optimiser (lr 1e-3, betas (0.5, 0.999)) on the summed losses of
every head (VA, TA and each PQA layer):
``CE(logits, label) + Focal(2-channel map, mask) + Dice(abnormal, mask) + Dice(normal, 1 - mask)``.
BatchNorms use batch statistics (train mode). VA is scored against the fixed static anchors and TA
with the unadapted visual features, which is how the "alternating" adaptation is realised.

Runs on the loop shared with AnomalyCLIP (``_loop``). Outputs in ``out``: ``epoch_NNN.safetensors``
(every ``checkpoint_every`` epochs and the last), ``adapters.safetensors`` (final),
``last.safetensors`` + ``optimizer.pt`` + ``train_state.json`` (resume point after every epoch and
every ``checkpoint_every_steps`` steps; resuming a run made with other settings is refused),
``loss_log.jsonl`` (one line per step).

Randomness: the query order and the prompt draws of epoch e come from a local
``random.Random(seed * 100_003 + e)`` (e 1-based), drawn in full at the start of the epoch, so a
resumed run (even mid-epoch) repeats an uninterrupted one; the global generators are not touched.
"""

from __future__ import annotations

import random
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from anomalens.data.io import load_image
from anomalens.detectors._adaptclip_checkpoint import save_adapter_checkpoint
from anomalens.detectors._adaptclip_modules import AdaptCLIPAdapters
from anomalens.training._loop import (
    ProgressFn,
    TrainConfig,
    TrainResult,
    frozen_backbone,
    load_masks,
    run_training,
)
from anomalens.training.losses import head_loss
from anomalens.types import Sample

if TYPE_CHECKING:
    from anomalens.backbones.clip import ClipBackbone
    from anomalens.detectors.adaptclip import AdaptCLIP

__all__ = ["AdaptCLIPTrainConfig", "TrainResult", "train_adaptclip"]

#: Backbone preset used when none is given (as the detector's).
DEFAULT_BACKBONE = "adaptclip-vitl14-336@518"
#: One query and its prompt of one step.
Batch = tuple[list[Sample], list[Sample]]


@dataclass(frozen=True)
class AdaptCLIPTrainConfig(TrainConfig):
    """Settings of :func:`train_adaptclip` (shared ones: :class:`TrainConfig`).

    Attributes:
        batch_size: queries per step (official 8); >= 2, and a last batch of one query is
            dropped (BatchNorm needs two).
        seed: seeds the adapter initialisation, the shuffling and the prompt draws.
        precision: backbone precision (None: fp32 for a preset name; adapters are fp32).
        init_checkpoint: adapters to start from (ignored when resuming).
        n_ctx, reduction, pq_mid_dim: adapter sizes of a fresh start.
    """

    seed: int = 10
    precision: str | None = None
    init_checkpoint: str | Path | None = None
    n_ctx: int = 12
    reduction: int = 4
    pq_mid_dim: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 2:
            raise ValueError(
                f"AdaptCLIP training needs batch_size >= 2 (BatchNorm), got {self.batch_size}"
            )


# ======================================================================================= data
def _split_samples(samples: Sequence[Sample]) -> tuple[list[Sample], dict[str, list[Sample]]]:
    """Queries (test split) and the normal prompt pool of each category (train split)."""
    queries = [s for s in samples if s.split == "test"]
    if not queries:
        raise ValueError("train_adaptclip needs samples of the auxiliary dataset's 'test' split")
    pools: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.split == "train" and s.label == 0:
            pools[s.category].append(s)
    for cat in sorted({q.category for q in queries}):
        if not pools.get(cat):
            fallback = [q for q in queries if q.category == cat and q.label == 0]
            if not fallback:
                raise ValueError(
                    f"category {cat!r} has no normal image to use as a prompt (no 'train' normal "
                    "and no normal 'test' image)"
                )
            warnings.warn(
                f"category {cat!r} has no 'train' normal images; prompts are drawn from its "
                "normal test images (possible leakage)",
                UserWarning,
                stacklevel=3,
            )
            pools[cat] = fallback
    return queries, dict(pools)


class _AdaptCLIPRecipe:
    """AdaptCLIP adapters, epoch plan and losses for :func:`run_training`."""

    log_name = "loss_log.jsonl"
    final_name = "adapters.safetensors"

    def __init__(
        self,
        det: AdaptCLIP,
        backbone_name: str,
        queries: list[Sample],
        pools: dict[str, list[Sample]],
        config: AdaptCLIPTrainConfig,
    ) -> None:
        self.det, self.backbone_name = det, backbone_name
        self.queries, self.pools, self.config = queries, pools, config

    @property
    def module(self) -> AdaptCLIPAdapters:
        return self.det.adapters

    def plan(self, epoch: int) -> list[Batch]:
        """Shuffled query batches (batches of one dropped) and one normal prompt per query."""
        rng = random.Random(self.config.seed * 100_003 + epoch + 1)
        order = list(range(len(self.queries)))
        rng.shuffle(order)
        size = self.config.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        plan = []
        for batch in (b for b in batches if len(b) >= 2):
            qs = [self.queries[i] for i in batch]
            plan.append((qs, [rng.choice(self.pools[q.category]) for q in qs]))
        return plan

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Summed global and local losses of every head (VA, TA, each PQA layer)."""
        det = self.det
        queries, prompts = batch
        feats = det.encode([load_image(q.image_path) for q in queries])
        prompt_feats = det.encode([load_image(p.image_path) for p in prompts])
        memory = [F.normalize(t[:, 1:].float(), dim=-1) for t in prompt_feats.patch_tokens]
        labels = torch.tensor([int(q.label > 0) for q in queries], device=det.device)
        masks = load_masks(queries, det.image_size).to(det.device)
        heads = det.heads(feats, det.ta_text_embeddings(), memory)
        assert heads.pq is not None  # memory was given
        parts = {
            "va": head_loss(heads.va_logits, heads.va_map, labels, masks),
            "ta": head_loss(heads.ta_logits, heads.ta_map, labels, masks),
        }
        for i, layer in enumerate(det.layers):
            parts[f"pq{layer}"] = head_loss(
                heads.pq.logits[:, i], heads.pq.maps[:, i], labels, masks
            )
        total: torch.Tensor | None = None
        for p in parts.values():  # summed in order (as the first version: same rounding)
            term = p["global"] + p["local"]
            total = term if total is None else total + term
        assert total is not None
        out = {"loss": total}
        for name, p in parts.items():
            out[f"{name}_global"] = p["global"]
            out[f"{name}_local"] = p["local"]
        return out

    def save(self, path: Path, extra: Mapping[str, Any]) -> None:
        adapters = self.det.adapters
        save_adapter_checkpoint(
            path,
            adapters.state_dict(),
            adapters.config,
            extra={"backbone": self.backbone_name, **extra},
        )

    def load(self, path: Path) -> None:
        self.det.load_checkpoint(path)


def train_adaptclip(
    samples: Sequence[Sample],
    backbone: str | ClipBackbone = DEFAULT_BACKBONE,
    out: str | Path = "runs/adaptclip",
    config: AdaptCLIPTrainConfig | None = None,
    *,
    progress: bool | ProgressFn = False,
) -> TrainResult:
    """Train the AdaptCLIP adapters.

    Args:
        samples: auxiliary dataset index: ``test`` samples are the queries (labels and masks
            used), ``train`` normal samples the prompt pools per category.
        backbone: CLIP preset name or ``ClipBackbone`` (frozen).
        out: output folder (created; see the module docstring).
        config: settings (default: the official ones).
        progress: True for a tqdm bar, or a callable called after every step with the loss-log
            row.

    Returns:
        :class:`TrainResult`; ``checkpoint`` is ``out/adapters.safetensors``.

    Raises:
        ValueError: no query, a category without a normal prompt image, bad settings, or a
            resume state with different settings.
    """
    from anomalens.detectors.adaptclip import AdaptCLIP

    config = config or AdaptCLIPTrainConfig()
    queries, pools = _split_samples(samples)
    bb, name = frozen_backbone(backbone, config, config.precision)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="AdaptCLIP adapters are untrained")
        det = AdaptCLIP(
            bb,
            checkpoint=config.init_checkpoint,
            untrained=config.init_checkpoint is None,  # training starts from random adapters
            device=config.device,
            batch_size=config.batch_size,
            n_ctx=config.n_ctx,
            reduction=config.reduction,
            pq_mid_dim=config.pq_mid_dim,
            seed=config.seed,
        )
    settings = {
        "backbone": name,
        "image_size": det.image_size,
        "precision": det.precision,
        "layers": list(det.layers),
        "vv_start": det.vv_start,
        "lr": config.lr,
        "betas": list(config.betas),
        "batch_size": config.batch_size,
        "seed": config.seed,
        "num_queries": len(queries),
        "num_prompts": sum(len(p) for p in pools.values()),
        "init_checkpoint": None if config.init_checkpoint is None else str(config.init_checkpoint),
        **det.adapters.config.to_dict(),
    }
    recipe = _AdaptCLIPRecipe(det, name, queries, pools, config)
    return run_training(recipe, out, config, settings, progress=progress, desc="adaptclip")
