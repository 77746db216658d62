"""Training recipe of AnomalyCLIP's object-agnostic prompts (on the shared loop, ``_loop``).

Official recipe (spec §5, ``train.py``): CLIP frozen in eval mode, image encoding under no-grad;
only the prompt learner is trained with Adam (lr 1e-3, betas (0.5, 0.999)), 15 epochs, batch 8,
518 px squash resize, no augmentation, masks resized and thresholded at 0.5; loss
``CE(ĝ·t̂/τ, y) + 4 Σ_layers [Focal(S, m) + Dice(S_a, m) + Dice(S_n, 1 - m)]``; trained on the
test split (all classes, with masks) of one auxiliary dataset, tested zero-shot on others.

Output folder ``out``:

* ``anomalyclip_prompts.safetensors``: final prompts (load with ``AnomalyCLIP(checkpoint=...)``);
* ``epoch_NNN.safetensors``: prompts after epoch NNN (every ``checkpoint_every`` epochs);
* ``last.safetensors`` + ``optimizer.pt`` + ``train_state.json``: resume point (every epoch and
  every ``checkpoint_every_steps`` steps); ``optimizer.pt`` holds tensors and numbers only and
  loads with ``torch.load(weights_only=True)``;
* ``losses.jsonl``: one JSON line per step (epoch, step, time, loss, image_loss, pixel_loss).

The batch order of epoch e is a permutation drawn from a local generator seeded with ``seed``
and e alone, so a run resumed after an interruption (even mid-epoch) follows the same order as
an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anomalens.detectors._anomalyclip_checkpoint import (
    load_prompt_checkpoint,
    save_prompt_checkpoint,
)
from anomalens.detectors._anomalyclip_modules import (
    AnomalyCLIPPromptLearner,
    PromptConfig,
    patch_text_probs,
    similarity_maps,
)
from anomalens.detectors.anomalyclip import (
    DEFAULT_BACKBONE,
    OFFICIAL_DEPTH,
    build_prompt_learner,
    default_layers,
    default_vv_start,
    encode_prompts,
)
from anomalens.scoring.similarity import DEFAULT_TEMPERATURE, image_logits
from anomalens.training._loop import (
    TrainConfig,
    TrainResult,
    frozen_backbone,
    load_masks,
    run_training,
)
from anomalens.training.losses import anomalyclip_loss
from anomalens.types import Sample

if TYPE_CHECKING:
    from anomalens.backbones.clip import ClipBackbone

__all__ = ["FINAL_NAME", "AnomalyCLIPTrainConfig", "train_anomalyclip"]

#: File name of the final prompts in the output folder.
FINAL_NAME = "anomalyclip_prompts.safetensors"


@dataclass(frozen=True)
class AnomalyCLIPTrainConfig(TrainConfig):
    """Settings of :func:`train_anomalyclip` (shared ones: :class:`TrainConfig`).

    Attributes:
        seed: prompt initialisation and shuffling seed (official 111).
        layers: tapped blocks whose maps enter the loss (default: last block; official train.py
            default (6, 12, 18, 24), train.sh 24).
        vv_start: first V-V block (default 6 for 24 blocks).
        n_ctx, depth, t_n_ctx: prompt sizes (official 12, 9, 4; depth capped by the text tower).
        pixel_weight: lambda of the map losses (official 4).
        temperature: tau (official 0.07).
        cache_features: keep each image's encoder outputs in memory after its first visit (the
            encoder is frozen and there is no augmentation, so results are unchanged; memory:
            images x layers x (1+N) x D floats).
        fp16_deep_prompts: official float16 rounding of the deep prompts.
    """

    seed: int = 111
    layers: tuple[int, ...] | None = None
    vv_start: int | None = None
    n_ctx: int = 12
    depth: int | None = None
    t_n_ctx: int = 4
    pixel_weight: float = 4.0
    temperature: float = DEFAULT_TEMPERATURE
    cache_features: bool = False
    fp16_deep_prompts: bool = True


def _check_samples(samples: Sequence[Sample]) -> None:
    if not samples:
        raise ValueError("train_anomalyclip got no training sample")
    bad = [str(s.image_path) for s in samples if s.label not in (0, 1)]
    if bad:
        raise ValueError(
            f"AnomalyCLIP training needs labelled samples (0 normal / 1 anomalous); unlabelled: "
            f"{bad[:3]}{' ...' if len(bad) > 3 else ''}"
        )
    if not any(s.label == 1 and s.mask_path is not None for s in samples):
        raise ValueError(
            "AnomalyCLIP training needs anomalous samples with masks (use the test split of an "
            "annotated auxiliary dataset, as the official protocol does)"
        )


class _FeatureCache:
    """Encoder outputs of training images by index (kept only with ``keep``)."""

    def __init__(
        self,
        backbone: ClipBackbone,
        samples: Sequence[Sample],
        layers: tuple[int, ...],
        vv_start: int,
        keep: bool,
    ) -> None:
        self.backbone, self.samples, self.layers, self.vv_start = (
            backbone,
            samples,
            layers,
            vv_start,
        )
        self.keep = keep
        self._cache: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, indices: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per layer (B, 1+N, D) tokens and (B, D) global embeddings of ``indices``."""
        bb, dev = self.backbone, self.backbone.device
        todo = [i for i in indices if i not in self._cache]
        if todo:
            x = bb.preprocess([self.samples[i].image_path for i in todo])
            with torch.no_grad():
                f = bb.encode_image(x.to(dev), layers=self.layers, vv_start=self.vv_start)
            for j, i in enumerate(todo):
                self._cache[i] = ([t[j] for t in f.patch_tokens], f.global_embedding[j])
        tokens = [
            torch.stack([self._cache[i][0][k] for i in indices]).to(dev)
            for k in range(len(self.layers))
        ]
        glob = torch.stack([self._cache[i][1] for i in indices]).to(dev)
        if not self.keep:
            self._cache.clear()
        return tokens, glob


class _AnomalyCLIPRecipe:
    """Prompt learner, epoch plan and loss of AnomalyCLIP for :func:`run_training`."""

    log_name = "losses.jsonl"
    final_name = FINAL_NAME

    def __init__(
        self,
        backbone: ClipBackbone,
        backbone_name: str,
        learner: AnomalyCLIPPromptLearner,
        samples: Sequence[Sample],
        features: _FeatureCache,
        config: AnomalyCLIPTrainConfig,
    ) -> None:
        self.backbone, self.backbone_name, self.learner = backbone, backbone_name, learner
        self.samples, self.features, self.config = samples, features, config

    @property
    def module(self) -> AnomalyCLIPPromptLearner:
        return self.learner

    def plan(self, epoch: int) -> list[list[int]]:
        """Index batches of one epoch: a permutation drawn from (seed, epoch) only."""
        n, size = len(self.samples), self.config.batch_size
        g = torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + int(epoch))
        order = torch.randperm(n, generator=g).tolist()
        return [order[i : i + size] for i in range(0, n, size)]

    def losses(self, batch: list[int]) -> dict[str, torch.Tensor]:
        cfg, dev = self.config, self.backbone.device
        tokens, glob = self.features(batch)
        samples = [self.samples[i] for i in batch]
        labels = torch.tensor([s.label for s in samples], device=dev)
        size = int(self.backbone.image_size)
        masks = load_masks(samples, size).to(dev)
        text = encode_prompts(self.backbone, self.learner)
        logits = image_logits(glob, text, cfg.temperature)
        grid = self.backbone.grid_size
        maps = [
            similarity_maps(patch_text_probs(t, text, cfg.temperature), grid, size) for t in tokens
        ]
        return anomalyclip_loss(logits, labels, maps, masks, cfg.pixel_weight)

    def save(self, path: Path, extra: Mapping[str, Any]) -> None:
        save_prompt_checkpoint(
            path,
            self.learner.state_dict(),
            self.learner.config,
            extra={"backbone": self.backbone_name, **extra},
        )

    def load(self, path: Path) -> None:
        state, _ = load_prompt_checkpoint(path)
        self.learner.load_state_dict(state, strict=True)


def _prompt_config(backbone: ClipBackbone, config: AnomalyCLIPTrainConfig) -> PromptConfig:
    depth = config.depth
    if depth is None:
        depth = min(OFFICIAL_DEPTH, int(backbone.num_text_layers))
    return PromptConfig(
        text_width=int(backbone.text_width), n_ctx=config.n_ctx, depth=depth, t_n_ctx=config.t_n_ctx
    )


def _settings(
    name: str,
    backbone: ClipBackbone,
    layers: tuple[int, ...],
    vv_start: int,
    prompts: PromptConfig,
    num_samples: int,
    config: AnomalyCLIPTrainConfig,
) -> dict[str, Any]:
    """Everything that determines the trained prompts (checked when resuming)."""
    return {
        "backbone": name,
        "image_size": int(backbone.image_size),
        "layers": list(layers),
        "vv_start": vv_start,
        "lr": config.lr,
        "betas": list(config.betas),
        "batch_size": config.batch_size,
        "pixel_weight": config.pixel_weight,
        "temperature": config.temperature,
        "seed": config.seed,
        "num_samples": num_samples,
        "fp16_deep_prompts": config.fp16_deep_prompts,
        **asdict(prompts),
    }


def train_anomalyclip(
    train_samples: Sequence[Sample],
    backbone: str | ClipBackbone = DEFAULT_BACKBONE,
    out: str | Path = "runs/anomalyclip",
    config: AnomalyCLIPTrainConfig | None = None,
    *,
    progress: bool = True,
) -> TrainResult:
    """Train AnomalyCLIP's prompt learner on labelled, annotated samples.

    Args:
        train_samples: images with labels (0/1) and masks (anomalous ones), all categories mixed
            (official: the test split of the auxiliary dataset).
        backbone: CLIP preset name or a ``ClipBackbone`` (frozen; resized to
            ``config.image_size`` if given).
        out: output folder (see the module docstring).
        config: settings (default: the official ones).
        progress: show a tqdm progress bar.

    Returns:
        :class:`TrainResult`; ``checkpoint`` is ``out/anomalyclip_prompts.safetensors``.

    Raises:
        ValueError: bad samples or settings, or a resume state with different settings.
    """
    config = config or AnomalyCLIPTrainConfig()
    _check_samples(train_samples)
    bb, name = frozen_backbone(backbone, config)
    num_blocks = int(bb.num_layers)
    layers = tuple(int(i) for i in (config.layers or default_layers(num_blocks)))
    vv = int(config.vv_start) if config.vv_start is not None else default_vv_start(num_blocks)
    prompts = _prompt_config(bb, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        learner = build_prompt_learner(bb, prompts, config.fp16_deep_prompts)
    learner.to(bb.device)
    features = _FeatureCache(bb, train_samples, layers, vv, keep=config.cache_features)
    recipe = _AnomalyCLIPRecipe(bb, name, learner, train_samples, features, config)
    settings = _settings(name, bb, layers, vv, prompts, len(train_samples), config)
    return run_training(recipe, out, config, settings, progress=progress, desc="anomalyclip")
