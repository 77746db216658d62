"""AdaptCLIP: a frozen CLIP with visual, textual and prompt-query adapters (zero- or few-shot).

Gao et al., "AdaptCLIP: Adapting CLIP for Universal Visual Anomaly Detection" (arXiv 2505.09926).
Implemented from the method spec; parity with the official code is checked on recorded fixtures
(``tests/unit/test_adaptclip_parity.py``).

* zero-shot (``fit(None)``): visual adapter (VA) + textual adapter (TA);
* k-shot (``fit(k normal images)``): VA + TA + prompt-query adapter (PQA) against the patch
  tokens of the k normal images, plus the raw nearest-normal distance (align) map.

The adapters are trained once on an auxiliary dataset (``anomalens.training.adaptclip``) and
never on the target. Without ``checkpoint`` the official adapters trained on MVTec AD are used
(catalogue name ``adaptclip-mvtec``, fetched and cached; ``adaptclip-visa`` for MVTec AD
itself). Random adapters only with ``untrained=True``: such a detector warns and marks every
output, since its scores are not meaningful.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from anomalens.data.io import ImageLike
from anomalens.detectors._adaptclip_checkpoint import (
    config_from_state_dict,
    load_adapter_checkpoint,
    save_adapter_checkpoint,
)
from anomalens.detectors._adaptclip_modules import (
    AdaptCLIPAdapters,
    AdaptCLIPHeads,
    AdapterConfig,
    FusionType,
    adaptclip_heads,
    fuse_few_shot,
    fuse_zero_shot,
)
from anomalens.detectors._clip_base import FrozenClipDetector, untrained_marker
from anomalens.prompts.adaptclip import placeholder_prompt, static_sentences
from anomalens.registry import register_detector
from anomalens.scoring.similarity import DEFAULT_TEMPERATURE
from anomalens.types import LearningType, Prediction

if TYPE_CHECKING:
    from anomalens.backbones.clip import ClipBackbone

__all__ = ["AdaptCLIP", "default_layers", "default_vv_start"]

#: Backbone preset used when none is given (OpenAI ViT-L/14@336 at 518 px, QuickGELU).
DEFAULT_BACKBONE = "adaptclip-vitl14-336@518"
_WHAT = "AdaptCLIP adapters"

# official settings per vision depth: tapped layers and first V-V (DPAM) block, 1-indexed
_OFFICIAL_LAYERS = {24: (6, 12, 18, 24), 12: (3, 6, 9, 12)}
_OFFICIAL_VV_START = {24: 6, 12: 4}


def default_layers(num_blocks: int) -> tuple[int, ...]:
    """Tapped blocks (1-indexed): the official [6,12,18,24] for 24 blocks, else 4 even quarters."""
    if num_blocks in _OFFICIAL_LAYERS:
        return _OFFICIAL_LAYERS[num_blocks]
    if num_blocks < 4:
        return tuple(range(1, num_blocks + 1))
    return tuple(round(num_blocks * i / 4) for i in range(1, 5))


def default_vv_start(num_blocks: int) -> int:
    """First block of the V-V path: 6 for 24 blocks (DPAM_layer 20), 4 for 12 (DPAM_layer 10)."""
    return _OFFICIAL_VV_START.get(num_blocks, default_layers(num_blocks)[0])


@register_detector("adaptclip")
class AdaptCLIP(FrozenClipDetector):
    """AdaptCLIP: frozen CLIP + visual, textual and prompt-query adapters; zero- and few-shot.

    Args:
        backbone: CLIP preset name (default ``"adaptclip-vitl14-336@518"``; also
            ``"adaptclip-vitb16plus-240@512"``) or a built ``ClipBackbone``.
        checkpoint: adapter weights: our safetensors file, an official ``epoch_15.pth``
            (remapped by ``checkpoint_filter_fn``), or a catalogue name (``adaptclip-mvtec``,
            ``adaptclip-visa``: fetched and cached). None = ``adaptclip-mvtec`` (the official
            backbone only; another backbone needs a checkpoint or ``untrained``).
        untrained: run with random adapters on purpose (tests, smoke runs); marked in
            ``config()`` and every output. Without it, a missing checkpoint is an error.
        device: torch device.
        batch_size: images per forward pass.
        layers: tapped blocks (1-indexed); default official for 24/12-block models.
        vv_start: first block of the V-V attention path; default official.
        n_ctx: learned prompt tokens per class (untrained adapters only; a checkpoint sets it).
        reduction: VA bottleneck reduction (untrained adapters only).
        pq_mid_dim: PQA hidden width (untrained adapters only).
        pq_context: PQA fused feature ``q + |q - p*|`` (True, official) or ``|q - p*|``.
        temperature: softmax temperature of all text similarities (official 0.07).
        sigma: Gaussian smoothing of the final map in pixels (official 4; 0 disables).
        fusion: 3-way combination of VA, TA and PQA (``"average_mean"`` official, or
            ``"harmonic_mean"``).
        global_ln_post: apply ``ln_post`` to the global embedding (False = official quirk).
        seed: seed of the random adapter initialisation.
        return_extras: put per-head maps into ``Prediction.extras`` (per-head scores always).
    """

    learning_type = LearningType.ZERO_OR_FEW_SHOT
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
        reduction: int = 4,
        pq_mid_dim: int = 128,
        pq_context: bool = True,
        temperature: float = DEFAULT_TEMPERATURE,
        sigma: float = 4.0,
        fusion: FusionType = "average_mean",
        global_ln_post: bool = False,
        seed: int = 0,
        return_extras: bool = False,
        untrained: bool = False,
    ) -> None:
        super().__init__(device)
        ckpt: tuple[Path | None, str | None] = (None, None)
        if checkpoint is not None:  # a given file is checked before the backbone is built
            ckpt = self._pick_checkpoint(checkpoint, untrained, _WHAT)
        if fusion not in ("average_mean", "harmonic_mean"):
            raise ValueError(f"fusion must be 'average_mean' or 'harmonic_mean', got {fusion!r}")
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
        self.pq_context = pq_context
        self.temperature = float(temperature)
        self.sigma = float(sigma)
        self.fusion: FusionType = fusion
        self.seed = seed
        self.return_extras = return_extras
        self._memory: list[torch.Tensor] | None = None
        self._ta_text: torch.Tensor | None = None
        self.static_text = self._static_anchors()
        self.adapter_source = "untrained"
        self.checkpoint_path: str | None = None
        self.checkpoint_name: str | None = None
        config = AdapterConfig(
            embed_dim=int(self.backbone.embed_dim),
            text_width=int(self.backbone.text_width),
            n_ctx=n_ctx,
            reduction=reduction,
            mid_dim=pq_mid_dim,
            num_layers=len(self.layers),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adapters = AdaptCLIPAdapters(config, pq_context=pq_context)
        self._set_placeholder()
        self.adapters.to(self.device).eval()
        if ckpt[0] is not None:
            self.load_checkpoint(ckpt[0])
            self.checkpoint_name = ckpt[1]
        else:
            warnings.warn(
                f"AdaptCLIP adapters are untrained (random init, seed {seed}, untrained=True): "
                "scores are not meaningful; drop --untrained to use the official adapters, or "
                "train some with `anomalens train adaptclip`",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------ text
    @torch.no_grad()
    def _static_anchors(self) -> torch.Tensor:
        """(2, D) means of the raw static sentence embeddings (normal, abnormal)."""
        normal, abnormal = static_sentences()
        rows = []
        for sentences in (normal, abnormal):
            ids = self.backbone.tokenize(sentences).to(self.device)
            rows.append(self.backbone.encode_text(ids).float().mean(dim=0))
        return torch.stack(rows)

    @torch.no_grad()
    def _set_placeholder(self) -> None:
        ids = self.backbone.tokenize([placeholder_prompt(self.adapters.config.n_ctx)])
        ids = ids.to(self.device)
        emb = self.backbone.token_embedding(ids).float()
        self.adapters.textual.set_placeholder(emb[0], ids[0])

    def ta_text_embeddings(self) -> torch.Tensor:
        """(2, D) TA text embeddings (normal, abnormal) from the learned prompts."""
        ta = self.adapters.textual
        emb = ta.prompt_embeddings().to(self.device)
        return self.backbone.encode_text_from_embeddings(emb, ta.token_ids).float()

    def _text(self) -> torch.Tensor:
        if self._ta_text is None:
            with torch.no_grad():
                self._ta_text = self.ta_text_embeddings()
        return self._ta_text

    # ---------------------------------------------------------------------------- images
    def _fit(self, normal_images: list[ImageLike]) -> None:
        if not normal_images:
            self._memory = None
            return
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.layers]
        for start in range(0, len(normal_images), self.batch_size):
            feats = self.encode(normal_images[start : start + self.batch_size])
            for i, tokens in enumerate(feats.patch_tokens):
                per_layer[i].append(F.normalize(tokens[:, 1:].float(), dim=-1).flatten(0, 1))
        self._memory = [torch.cat(chunks) for chunks in per_layer]

    def heads(
        self, feats: Any, ta_text: torch.Tensor, memory: list[torch.Tensor] | None
    ) -> AdaptCLIPHeads:
        """Every head on encoded images (differentiable in the adapters; see ``adaptclip_heads``).

        Args:
            feats: output of :meth:`encode`.
            ta_text: (2, D) TA text embeddings (cached ones, or fresh ones while training).
            memory: per layer the L2-normalised normal patches, or None (zero-shot).
        """
        return adaptclip_heads(
            self.adapters,
            [t.float() for t in feats.patch_tokens],
            feats.global_embedding.float(),
            tuple(feats.grid_size),
            self.image_size,
            self.static_text,
            ta_text,
            memory,
            self.temperature,
        )

    def score_features(self, feats: Any) -> dict[str, torch.Tensor]:
        """All heads and the fusion for encoded images (see ``adaptclip_heads``).

        Returns:
            the head outputs (``AdaptCLIPHeads.to_dict()``) plus ``anomaly_map`` (B, S, S),
            ``image_score`` (B,) and the per-head abnormal probabilities ``va_score``,
            ``ta_score`` (B,), ``pq_score`` (B,).
        """
        heads = self.heads(feats, self._text(), self._memory)
        va_score = heads.va_logits.softmax(-1)[:, 1]
        ta_score = heads.ta_logits.softmax(-1)[:, 1]
        out = dict(heads.to_dict(), va_score=va_score, ta_score=ta_score)
        if heads.pq is None:
            fused = fuse_zero_shot(
                heads.va_map[:, 1], heads.ta_map[:, 1], va_score, ta_score, self.sigma
            )
        else:
            pq_scores = heads.pq.logits.softmax(-1)[..., 1]
            out["pq_score"] = pq_scores.mean(dim=1)
            fused = fuse_few_shot(
                heads.va_map[:, 1],
                heads.ta_map[:, 1],
                heads.pq.maps[:, :, 1],
                heads.pq.align,
                va_score,
                ta_score,
                pq_scores,
                self.sigma,
                self.fusion,
            )
        out.update(fused)
        return out

    def _predict(self, images: list[ImageLike]) -> Prediction:
        scores, maps = [], []
        extras: dict[str, list[torch.Tensor]] = {}
        keep = ["va_score", "ta_score"] + (["pq_score"] if self._memory is not None else [])
        if self.return_extras:
            keep += ["va_map", "ta_map", "fused"]
            keep += ["pq_map", "align_hm"] if self._memory is not None else []
        for start in range(0, len(images), self.batch_size):
            out = self.score_features(self.encode(images[start : start + self.batch_size]))
            scores.append(out["image_score"])
            maps.append(out["anomaly_map"])
            for key in keep:
                value = out[key][:, 1] if key in ("va_map", "ta_map") else out[key]
                extras.setdefault(key, []).append(value)
        # everything stays on the device until here: one transfer per output, not per batch
        return Prediction(
            image_score=torch.cat(scores),
            anomaly_map=torch.cat(maps),
            extras={k: torch.cat(v).float().cpu() for k, v in extras.items()},
        )

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the adapters as safetensors (config and backbone name in the metadata)."""
        return save_adapter_checkpoint(
            path,
            self.adapters.state_dict(),
            self.adapters.config,
            extra={"backbone": self.backbone_name, "source": self.adapter_source},
        )

    def load_checkpoint(self, path: str | Path) -> None:
        """Load adapters from our safetensors file or an official ``.pth`` checkpoint.

        Raises:
            ValueError: the checkpoint's sizes do not fit this backbone / these layers.
        """
        state, info = load_adapter_checkpoint(path)
        config = config_from_state_dict(state)
        expected = {
            "embed_dim": int(self.static_text.shape[-1]),
            "text_width": int(self.backbone.text_width),
            "num_layers": len(self.layers),
        }
        wrong = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
        if wrong:
            detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in wrong.items())
            raise ValueError(
                f"AdaptCLIP checkpoint {path} does not fit backbone {self.backbone_name!r} "
                f"with layers {self.layers} ({detail})"
            )
        adapters = AdaptCLIPAdapters(config, pq_context=self.pq_context)
        adapters.load_state_dict(state, strict=True)
        self.adapters = adapters.to(self.device).eval()
        self.adapter_source = "anomalens" if info.ours else "official"
        self.checkpoint_path = str(path)
        self._ta_text = None

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(
            {
                "backbone": self.backbone_name,
                "precision": self.precision,
                "adapters": self.adapter_source,
                "checkpoint": self.checkpoint_path,
                "checkpoint_name": self.checkpoint_name,
                "untrained": self.untrained,
                "layers": list(self.layers),
                "vv_start": self.vv_start,
                "pq_context": self.pq_context,
                "temperature": self.temperature,
                "sigma": self.sigma,
                "fusion": self.fusion,
                "global_ln_post": self.global_ln_post,
                "seed": self.seed,
                **{f"adapter_{k}": v for k, v in self.adapters.config.to_dict().items()},
            }
        )
        if self.untrained:
            cfg["warning"] = untrained_marker("AdaptCLIP", "adapters")
        return cfg

    # ------------------------------------------------------------------------ model files
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Adapter weights (``adapters.*``), the static and learned text anchors (2, D) and
        the few-shot patch memory per tapped layer (``memory.i`` (k*N, D); none zero-shot)."""
        out = {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}
        out["static_text"] = self.static_text
        out["ta_text"] = self._text()
        for i, m in enumerate(self._memory or []):
            out[f"memory.{i}"] = m
        return out

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Restore adapters, text anchors and memory; provenance from the saved config."""
        state = {
            k.removeprefix("adapters."): v for k, v in tensors.items() if k.startswith("adapters.")
        }
        adapters = AdaptCLIPAdapters(config_from_state_dict(state), pq_context=self.pq_context)
        adapters.load_state_dict(state, strict=True)
        self.adapters = adapters.to(self.device).eval()
        self.static_text = tensors["static_text"].to(self.device)
        self._ta_text = tensors["ta_text"].to(self.device)
        n = sum(k.startswith("memory.") for k in tensors)
        if n and n != len(self.layers):
            raise ValueError(f"{n} memory layers saved for {len(self.layers)} tapped layers")
        self._memory = [tensors[f"memory.{i}"].to(self.device) for i in range(n)] or None
        self.adapter_source = str(config.get("adapters", self.adapter_source))
        self.checkpoint_path = config.get("checkpoint")
        self.checkpoint_name = config.get("checkpoint_name")
        self.untrained = bool(config.get("untrained", self.adapter_source == "untrained"))
