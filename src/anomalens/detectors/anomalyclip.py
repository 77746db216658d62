"""AnomalyCLIP: object-agnostic learnable prompts on a frozen CLIP (zero-shot).

Zhou et al., "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection"
(ICLR 2024, arXiv 2310.18961). Implemented from the method spec; parity with the official code
is checked on recorded fixtures (``tests/unit/test_anomalyclip_parity.py``).

Two class-free prompts ("[V..] object." / "[W..] damaged object.") plus deep text tokens are
learned once on an auxiliary dataset (``anomalens.training.anomalyclip``; by default the official
prompts trained on MVTec AD, catalogue name ``anomalyclip-mvtec``, are fetched and cached; random
prompts only with ``untrained=True``, marked in every output); at test time the
image score is the abnormal probability of the global embedding against them and the map
compares the V-V-stream patch tokens of the tapped layers with them. No normal image of the
target category is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anomalens.data.io import ImageLike
from anomalens.detectors._anomalyclip_checkpoint import (
    config_from_state_dict,
    load_prompt_checkpoint,
    save_prompt_checkpoint,
)
from anomalens.detectors._anomalyclip_modules import (
    AnomalyCLIPPromptLearner,
    PromptConfig,
    anomalyclip_scores,
    placeholder_prompts,
)
from anomalens.detectors._clip_base import FrozenClipDetector, untrained_marker
from anomalens.registry import register_detector
from anomalens.scoring.similarity import DEFAULT_TEMPERATURE
from anomalens.types import LearningType, Prediction

if TYPE_CHECKING:
    from anomalens.backbones.clip import ClipBackbone

__all__ = ["AnomalyCLIP", "default_layers", "default_vv_start", "encode_prompts"]

#: Backbone preset used when none is given (OpenAI ViT-L/14@336 at 518 px, QuickGELU).
DEFAULT_BACKBONE = "adaptclip-vitl14-336@518"
#: Official deep-prompt depth (deep tokens before text blocks 2..9).
OFFICIAL_DEPTH = 9
_WHAT = "AnomalyCLIP prompts"


def default_layers(num_blocks: int) -> tuple[int, ...]:
    """Tapped blocks: only the last one (the official test.sh / released results use block 24)."""
    return (num_blocks,)


def default_vv_start(num_blocks: int) -> int:
    """First V-V block: ``DPAM_layer = 20`` refines the last 19 of 24 blocks (from block 6).

    12 blocks -> block 4 (the ViT-B setting of the same code base); other depths keep about the
    last 80 % of the blocks (4 -> block 2).
    """
    official = {24: 6, 12: 4}
    if num_blocks in official:
        return official[num_blocks]
    return max(1, num_blocks - round(0.8 * num_blocks) + 1)


def encode_prompts(backbone: ClipBackbone, learner: AnomalyCLIPPromptLearner) -> torch.Tensor:
    """(2, D) text embeddings [normal, abnormal] (not normalised); differentiable in the prompts."""
    emb, ids, deep = learner()
    dev = backbone.device
    return backbone.encode_text_from_embeddings(
        emb.to(dev), ids.to(dev), [p.to(dev) for p in deep] or None
    ).float()


def build_prompt_learner(
    backbone: ClipBackbone, config: PromptConfig, fp16_deep_prompts: bool = True
) -> AnomalyCLIPPromptLearner:
    """Prompt learner for ``backbone`` with its frozen template set (CPU, float32).

    Raises:
        ValueError: the sizes do not fit the backbone's text tower.
    """
    if config.text_width != backbone.text_width:
        raise ValueError(
            f"prompt width {config.text_width} != text width {backbone.text_width} of the backbone"
        )
    if config.num_deep > backbone.num_text_layers - 1:
        raise ValueError(
            f"deep-prompt depth {config.depth} needs {config.depth} text blocks but the backbone "
            f"has {backbone.num_text_layers}; use depth <= {backbone.num_text_layers}"
        )
    if 1 + config.n_ctx + 3 > backbone.context_length:
        raise ValueError(f"n_ctx={config.n_ctx} does not fit the context length")
    learner = AnomalyCLIPPromptLearner(config, fp16_deep_prompts=fp16_deep_prompts)
    ids = backbone.tokenize(list(placeholder_prompts(config.n_ctx)))
    learner.set_template(backbone.token_embedding(ids).cpu(), ids)
    return learner


@register_detector("anomalyclip")
class AnomalyCLIP(FrozenClipDetector):
    """AnomalyCLIP: object-agnostic learned prompts on a V-V-refined CLIP; zero-shot.

    Args:
        backbone: CLIP preset name (default ``"adaptclip-vitl14-336@518"``) or a ``ClipBackbone``.
        checkpoint: prompt learner: our safetensors file, an official ``epoch_15.pth``
            (remapped by ``checkpoint_filter_fn``), or a catalogue name (``anomalyclip-mvtec``,
            ``anomalyclip-visa``: fetched, checked by git blob id, cached). None =
            ``anomalyclip-mvtec`` (the official backbone only; another backbone needs a
            checkpoint or ``untrained``).
        device: torch device.
        batch_size: images per forward pass.
        layers: tapped blocks, 1-indexed (default: the last block, as the released results;
            the official test.py default is (6, 12, 18, 24)); per-layer maps are summed.
        vv_start: first block of the V-V (DPAM) path (default 6 for 24 blocks).
        n_ctx, depth, t_n_ctx: prompt sizes of untrained prompts (a checkpoint sets them);
            depth defaults to 9, capped by the text tower depth.
        temperature: softmax temperature (official 0.07).
        sigma: Gaussian smoothing of the final map in pixels (official 4; 0 disables).
        global_ln_post: apply ``ln_post`` to the global embedding (False = official).
        fp16_deep_prompts: round deep prompts to float16 as the official code (parity).
        seed: seed of the random prompt initialisation.
        return_extras: put the per-layer maps and the image logits into ``Prediction.extras``.
        untrained: run with random prompts on purpose (tests, smoke runs); marked in
            ``config()`` and every output. Without it, a missing checkpoint is an error.
    """

    learning_type = LearningType.ZERO_SHOT
    uses_normal_images = False
    backbone_kind = "clip"
    default_threshold = 0.5  # image scores are anomaly probabilities in [0, 1]

    def __init__(
        self,
        backbone: str | ClipBackbone = DEFAULT_BACKBONE,
        checkpoint: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        layers: Sequence[int] | None = None,
        vv_start: int | None = None,
        n_ctx: int = 12,
        depth: int | None = None,
        t_n_ctx: int = 4,
        temperature: float = DEFAULT_TEMPERATURE,
        sigma: float = 4.0,
        global_ln_post: bool = False,
        fp16_deep_prompts: bool = True,
        seed: int = 111,
        return_extras: bool = False,
        untrained: bool = False,
    ) -> None:
        super().__init__(device)
        ckpt: tuple[Path | None, str | None] = (None, None)
        if checkpoint is not None:  # a given file is checked before the backbone is built
            ckpt = self._pick_checkpoint(checkpoint, untrained, _WHAT)
        self._init_clip(
            backbone,
            batch_size=batch_size,
            layers=layers,
            vv_start=vv_start,
            default_layers=default_layers,
            default_vv_start=default_vv_start,
            global_ln_post=global_ln_post,
        )
        if checkpoint is None:
            ckpt = self._pick_checkpoint(None, untrained, _WHAT)
        self.untrained = bool(untrained)
        self.temperature = float(temperature)
        self.sigma = float(sigma)
        self.fp16_deep_prompts = fp16_deep_prompts
        self.seed = seed
        self.return_extras = return_extras
        self.prompt_source = "untrained"
        self.checkpoint_path: str | None = None
        self.checkpoint_name: str | None = None
        self._text: torch.Tensor | None = None
        if depth is None:
            depth = min(OFFICIAL_DEPTH, int(self.backbone.num_text_layers))
        config = PromptConfig(
            text_width=int(self.backbone.text_width), n_ctx=n_ctx, depth=depth, t_n_ctx=t_n_ctx
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            learner = build_prompt_learner(self.backbone, config, fp16_deep_prompts)
        self.prompt_learner = learner.to(self.device).eval()
        if ckpt[0] is not None:
            self.load_checkpoint(ckpt[0])
            self.checkpoint_name = ckpt[1]
        else:
            warnings.warn(
                f"AnomalyCLIP prompts are untrained (random init, seed {seed}, untrained=True): "
                "scores are not meaningful; drop --untrained to use the official prompts, or "
                "train some with `anomalens train anomalyclip`",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------ text
    def text_embeddings(self) -> torch.Tensor:
        """(2, D) prompt embeddings [normal, abnormal], not normalised (cached)."""
        if self._text is None:
            with torch.no_grad():
                self._text = encode_prompts(self.backbone, self.prompt_learner)
        return self._text

    # ---------------------------------------------------------------------------- images
    def score_features(self, feats: Any) -> dict[str, torch.Tensor]:
        """Scores of encoded images (see ``anomalyclip_scores``)."""
        return anomalyclip_scores(
            [t.float() for t in feats.patch_tokens],
            feats.global_embedding.float(),
            self.text_embeddings(),
            tuple(feats.grid_size),
            self.image_size,
            self.temperature,
            self.sigma,
        )

    def _fit(self, normal_images: list[ImageLike]) -> None:
        """Nothing to learn from normal images: AnomalyCLIP is zero-shot."""

    def _predict(self, images: list[ImageLike]) -> Prediction:
        scores, maps = [], []
        extras: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(images), self.batch_size):
            out = self.score_features(self.encode(images[start : start + self.batch_size]))
            scores.append(out["image_score"])
            maps.append(out["anomaly_map"])
            if self.return_extras:
                extras.setdefault("logits", []).append(out["logits"].cpu())
                extras.setdefault("layer_maps", []).append(out["layer_maps"].transpose(0, 1).cpu())
        return Prediction(
            image_score=torch.cat(scores),
            anomaly_map=torch.cat(maps),
            extras={k: torch.cat(v) for k, v in extras.items()},
        )

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the prompt learner as safetensors (sizes and backbone name in the metadata)."""
        return save_prompt_checkpoint(
            path,
            self.prompt_learner.state_dict(),
            self.prompt_learner.config,
            extra={"backbone": self.backbone_name, "source": self.prompt_source},
        )

    def load_checkpoint(self, path: str | Path) -> None:
        """Load prompts from our safetensors file or an official ``.pth`` checkpoint.

        Raises:
            ValueError: the checkpoint's sizes do not fit this backbone.
        """
        state, info = load_prompt_checkpoint(path)
        config = config_from_state_dict(state)
        try:
            learner = build_prompt_learner(self.backbone, config, self.fp16_deep_prompts)
        except ValueError as exc:
            raise ValueError(
                f"AnomalyCLIP checkpoint {path} does not fit backbone {self.backbone_name!r}: {exc}"
            ) from exc
        learner.load_state_dict(state, strict=True)
        self.prompt_learner = learner.to(self.device).eval()
        self.prompt_source = "anomalens" if info.ours else "official"
        self.checkpoint_path = str(path)
        self._text = None

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(
            {
                "backbone": self.backbone_name,
                "precision": self.precision,
                "prompts": self.prompt_source,
                "checkpoint": self.checkpoint_path,
                "checkpoint_name": self.checkpoint_name,
                "untrained": self.untrained,
                "layers": list(self.layers),
                "vv_start": self.vv_start,
                "temperature": self.temperature,
                "sigma": self.sigma,
                "global_ln_post": self.global_ln_post,
                "fp16_deep_prompts": self.fp16_deep_prompts,
                "seed": self.seed,
                **{f"prompt_{k}": v for k, v in self.prompt_learner.config.to_dict().items()},
            }
        )
        if self.untrained:
            cfg["warning"] = untrained_marker("AnomalyCLIP", "prompts")
        return cfg

    # ------------------------------------------------------------------------ model files
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Prompt learner weights (``prompt_learner.*``) and the prompt embeddings (2, D)."""
        out = {f"prompt_learner.{k}": v for k, v in self.prompt_learner.state_dict().items()}
        out["text"] = self.text_embeddings()
        return out

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Restore the prompt learner and its embeddings; provenance from the saved config."""
        prefix = "prompt_learner."
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        learner = build_prompt_learner(
            self.backbone, config_from_state_dict(state), self.fp16_deep_prompts
        )
        learner.load_state_dict(state, strict=True)
        self.prompt_learner = learner.to(self.device).eval()
        self._text = tensors["text"].to(self.device)
        self.prompt_source = str(config.get("prompts", self.prompt_source))
        self.checkpoint_path = config.get("checkpoint")
        self.checkpoint_name = config.get("checkpoint_name")
        self.untrained = bool(config.get("untrained", self.prompt_source == "untrained"))
