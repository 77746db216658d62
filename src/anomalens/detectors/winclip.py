"""WinCLIP (zero-shot) and WinCLIP+ (few-normal-shot), training-free CLIP anomaly detection.

Spec: ``methods/winclip.md`` (Jeong et al., CVPR 2023). A frozen CLIP scores the whole image and
every 2x2 and 3x3 patch window (the CLS embedding of a token-dropped sequence) against a normal and
an anomalous text prototype (compositional prompt ensemble). Window scores are spread to patches
by a harmonic mean; the per-scale maps and the image score are fused by a harmonic mean.
With k normal reference images (WinCLIP+), every query window and last-layer patch token also
scores its halved cosine distance to the nearest reference feature of its kind; that visual map
is averaged with the language map, and the image score is the mean of the language image score
and the maximum of the visual map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from anomalens.backbones.clip import ClipBackbone, Precision
from anomalens.data.io import ImageLike
from anomalens.detectors.base import Detector
from anomalens.prompts.encode import PrototypeAveraging, winclip_text_prototypes
from anomalens.prompts.templates import get_templates, object_name_from_category
from anomalens.registry import register_detector
from anomalens.scoring.aggregate import (
    harmonic_mean,
    harmonic_window_aggregate,
    window_index_sets,
)
from anomalens.scoring.maps import upsample
from anomalens.scoring.similarity import nearest_cosine_distance, two_class_anomaly_probability
from anomalens.types import LearningType, Prediction

__all__ = ["PATCH_FEATURES", "WinCLIP", "WinclipFeatures"]

PatchFeature = Literal["ln_post", "raw"]
#: Last-layer patch tokens stored for WinCLIP+: after ``LN_post`` (anomalib) or before (raw).
PATCH_FEATURES: tuple[str, ...] = ("ln_post", "raw")


@dataclass
class WinclipFeatures:
    """Everything WinCLIP reads from one batch of images.

    Attributes:
        global_embedding: (B, D) CLIP image embedding (CLS -> LN_post -> proj).
        windows: per scale k, (B, M_k, D) window embeddings.
        patch_tokens: (B, N, W) last-block patch tokens (unprojected), for WinCLIP+.
        grid_size: (h, w) patch grid, N = h * w.
    """

    global_embedding: torch.Tensor
    windows: dict[int, torch.Tensor]
    patch_tokens: torch.Tensor
    grid_size: tuple[int, int]


@register_detector("winclip")
class WinCLIP(Detector):
    """WinCLIP: zero-shot with ``fit(None)``, WinCLIP+ with ``fit(k normal images)``.

    Usage::

        det = create_detector("winclip", class_name="bottle")   # downloads ViT-B-16-plus-240
        det.fit(None)                 # zero-shot; or det.fit(normal_images) for WinCLIP+
        pred = det.predict(images)    # image_score (B,), anomaly_map (B, 240, 240)
    """

    learning_type = LearningType.ZERO_OR_FEW_SHOT
    uses_category = True
    backbone_kind = "clip"
    default_threshold = 0.5  # image scores are anomaly probabilities in [0, 1]

    def __init__(
        self,
        backbone: ClipBackbone | str | None = None,
        *,
        model_name: str = "ViT-B-16-plus-240",
        pretrained: str | None = "default",
        image_size: int | None = None,
        class_name: str = "object",
        templates: str = "paper22",
        scales: Sequence[int] = (2, 3),
        window_stride: int = 1,
        temperature: float = 0.07,
        prototype_average: PrototypeAveraging = "raw",
        patch_feature: PatchFeature = "ln_post",
        batch_size: int = 8,
        precision: Precision = "fp32",
        device: str | torch.device = "cpu",
    ) -> None:
        """Build the detector.

        Args:
            backbone: an already built :class:`ClipBackbone` (its size and device are used and
                ``model_name``, ``pretrained``, ``image_size``, ``precision``, ``device`` are
                ignored); a CLIP preset name (``anomalens list backbones``; ``pretrained`` and
                ``image_size`` override the preset's); None builds one from ``model_name``.
            model_name: open_clip architecture with a ViT image tower.
            pretrained: open_clip tag, local file, ``hf-hub:`` id or None (random weights);
                ``"default"``: ``laion400m_e31`` with ``model_name``, the preset's own weights
                with a preset name.
            image_size: input side S (squash-resize); maps are (S, S). Default: 240 with
                ``model_name``, the preset's size with a preset name.
            class_name: object word(s) in the prompts, e.g. ``"bottle"``; ``_`` becomes a space
                (``"metal_nut"`` -> ``"metal nut"``). Default ``"object"``.
            templates: ``"paper22"`` (the 22 templates of the paper) or ``"anomalib21"``.
            scales: window sides in patches (WinCLIP: 2 and 3).
            window_stride: window step in patches (WinCLIP: 1).
            temperature: softmax temperature of the two-class text score.
            prototype_average: ``"raw"`` (mean of raw text embeddings, the references) or
                ``"normalized"`` (mean of unit-norm embeddings).
            patch_feature: WinCLIP+ patch memory: last-block tokens after ``LN_post``
                (``"ln_post"``, anomalib) or before it (``"raw"``, Accurate-WinCLIP).
            batch_size: images per backbone forward.
            precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` when building the backbone.
            device: device when building the backbone.
        """
        if isinstance(backbone, str):
            backbone = ClipBackbone.from_preset(
                backbone,
                pretrained=None if pretrained == "default" else pretrained,
                image_size=image_size,
                precision=precision,
                device=device,
            )
        elif backbone is None:
            backbone = ClipBackbone.create(
                model_name,
                pretrained="laion400m_e31" if pretrained == "default" else pretrained,
                image_size=image_size or 240,
                precision=precision,
                device=device,
            )
        super().__init__(device=backbone.device)
        if not scales:
            raise ValueError("winclip option 'scales' needs at least one window size")
        if temperature <= 0:
            raise ValueError(f"winclip option 'temperature' must be > 0, got {temperature}")
        if patch_feature not in PATCH_FEATURES:
            raise ValueError(
                f"winclip option 'patch_feature' must be one of {PATCH_FEATURES}, "
                f"got {patch_feature!r}"
            )
        if prototype_average not in ("raw", "normalized"):
            raise ValueError(
                "winclip option 'prototype_average' must be 'raw' or 'normalized', "
                f"got {prototype_average!r}"
            )
        if batch_size < 1:
            raise ValueError(f"winclip option 'batch_size' must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.image_size = backbone.image_size
        self.templates_name = templates
        self.templates = get_templates(templates)
        self.scales = tuple(int(k) for k in scales)
        self.window_stride = int(window_stride)
        self.temperature = float(temperature)
        self.prototype_average: PrototypeAveraging = prototype_average
        self.patch_feature: PatchFeature = patch_feature
        self.batch_size = int(batch_size)
        grid = backbone.grid_size
        self.index_sets: dict[int, torch.Tensor] = {
            k: window_index_sets(grid, k, self.window_stride) for k in self.scales
        }
        self.class_name = ""
        self.default_class_name = class_name
        self._prototypes: dict[str, torch.Tensor] = {}
        self._memory: dict[str, torch.Tensor] = {}
        self.set_class_name(class_name)

    # ------------------------------------------------------------------------- prompts
    def set_class_name(self, class_name: str) -> None:
        """Change the object name of the prompts (text prototypes are cached per name)."""
        self.class_name = object_name_from_category(class_name)

    @property
    def text_prototypes(self) -> torch.Tensor:
        """(2, D) unit-norm ``[normal, anomalous]`` prototypes for ``class_name`` (cached)."""
        protos = self._prototypes.get(self.class_name)
        if protos is None:
            with torch.inference_mode():
                protos = winclip_text_prototypes(
                    self.backbone,
                    self.class_name,
                    templates=self.templates,
                    average=self.prototype_average,
                ).to(self.device)
            self._prototypes[self.class_name] = protos
        return protos

    # ------------------------------------------------------------------------- features
    def extract(self, images: Sequence[ImageLike] | torch.Tensor) -> WinclipFeatures:
        """Image, window and patch features of a batch (chunked by ``batch_size``).

        Args:
            images: raw images, or a (B, 3, S, S) tensor already preprocessed by the backbone.

        Returns:
            :class:`WinclipFeatures` (float32, on the backbone device).
        """
        x = (
            images
            if isinstance(images, torch.Tensor)
            else self.backbone.preprocess(images, device=self.device)
        )
        last = self.backbone.num_layers
        glob: list[torch.Tensor] = []
        patches: list[torch.Tensor] = []
        windows: dict[int, list[torch.Tensor]] = {k: [] for k in self.scales}
        ln_post = self.backbone.model.visual.ln_post
        # one chunk without a split: an exported graph (anomalens.export) has no chunk loop
        chunks = [x] if x.shape[0] <= self.batch_size else torch.split(x, self.batch_size)
        for chunk in chunks:
            toks = self.backbone.encode_image_tokens(chunk, layers=(last,)).final  # (b, 1+N, W)
            glob.append(self.backbone.project_tokens(toks[:, 0], ln_post=True))
            p = toks[:, 1:]
            if self.patch_feature == "ln_post":
                p = ln_post(p.to(self.backbone.dtype)).float()
            patches.append(p)
            for k in self.scales:
                windows[k].append(self.backbone.encode_windows(chunk, self.index_sets[k]))
        return WinclipFeatures(
            global_embedding=torch.cat(glob),
            windows={k: torch.cat(v) for k, v in windows.items()},
            patch_tokens=torch.cat(patches),
            grid_size=self.backbone.grid_size,
        )

    # ------------------------------------------------------------------------- detector API
    def _fit(self, normal_images: list[ImageLike]) -> None:
        """Cache the text prototypes; with reference images, build the WinCLIP+ memories.

        The prompts name ``fit(category=...)`` when given (the benchmark passes the dataset's
        category, as the paper and anomalib do), else the constructor's ``class_name``.
        """
        self.set_class_name(self.category if self.category else self.default_class_name)
        _ = self.text_prototypes
        self._memory = {}
        if not normal_images:
            return
        feats = self.extract(normal_images)
        self._memory["patch"] = feats.patch_tokens.reshape(-1, feats.patch_tokens.shape[-1])
        for k, w in feats.windows.items():
            self._memory[f"window_{k}"] = w.reshape(-1, w.shape[-1])

    @property
    def memory_sizes(self) -> dict[str, int]:
        """Number of stored reference vectors per memory (empty in zero-shot mode)."""
        return {name: int(m.shape[0]) for name, m in self._memory.items()}

    def _predict(self, images: list[ImageLike]) -> Prediction:
        return self.score_features(self.extract(images))

    def score_features(self, feats: WinclipFeatures) -> Prediction:
        """Language (and, after ``fit(images)``, visual) scores of extracted features.

        Returns:
            Prediction: image_score (B,), anomaly_map (B, S, S) on the backbone device.
        """
        protos = self.text_prototypes
        h, w = feats.grid_size
        n = h * w
        b = feats.global_embedding.shape[0]
        image_language = two_class_anomaly_probability(
            feats.global_embedding, protos, self.temperature
        )  # (B,)
        scale_maps = [
            harmonic_window_aggregate(
                two_class_anomaly_probability(feats.windows[k], protos, self.temperature),
                self.index_sets[k],
                n,
            )
            for k in self.scales
        ]
        language_map = harmonic_mean([*scale_maps, image_language[:, None]])  # (B, N)
        extras: dict[str, torch.Tensor] = {
            "language_image_score": image_language.float().cpu(),
            "language_map": language_map.reshape(b, h, w).float().cpu(),
        }
        if not self._memory:
            patch_map = language_map
            image_score = image_language
        else:
            visual_terms = [nearest_cosine_distance(feats.patch_tokens, self._memory["patch"])]
            for k in self.scales:
                dist = nearest_cosine_distance(feats.windows[k], self._memory[f"window_{k}"])
                visual_terms.append(harmonic_window_aggregate(dist, self.index_sets[k], n))
            visual_map = torch.stack(visual_terms).mean(dim=0)  # (B, N)
            patch_map = (language_map + visual_map) / 2
            visual_image = visual_map.amax(dim=1)
            image_score = (image_language + visual_image) / 2
            extras["visual_map"] = visual_map.reshape(b, h, w).float().cpu()
            extras["visual_image_score"] = visual_image.float().cpu()
        anomaly_map = upsample(patch_map.reshape(b, h, w), self.image_size, mode="bilinear")
        return Prediction(image_score=image_score, anomaly_map=anomaly_map, extras=extras)

    def config(self) -> dict[str, Any]:
        """Settings that determine the results."""
        cfg = super().config()
        cfg.update(
            backbone=self.backbone.describe(),
            class_name=self.class_name,
            templates=self.templates_name,
            scales=list(self.scales),
            window_stride=self.window_stride,
            temperature=self.temperature,
            prototype_average=self.prototype_average,
            patch_feature=self.patch_feature,
            batch_size=self.batch_size,
            memory_sizes=self.memory_sizes,
        )
        return cfg

    # ------------------------------------------------------------------------- model files
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Text prototypes (2, D) of the fitted object name and the WinCLIP+ memories
        (``memory.patch`` (k*N, W), ``memory.window_K`` (k*M_K, D); none in zero-shot)."""
        out = {"text_prototypes": self.text_prototypes}
        out.update({f"memory.{name}": m for name, m in self._memory.items()})
        return out

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Restore the prototypes (for ``config["class_name"]``) and the memories."""
        self.class_name = str(config["class_name"])
        self._prototypes = {self.class_name: tensors["text_prototypes"].to(self.device)}
        self._memory = {
            k.removeprefix("memory."): v.to(self.device)
            for k, v in tensors.items()
            if k.startswith("memory.")
        }
        expected = {"patch", *(f"window_{k}" for k in self.scales)}
        if self._memory and set(self._memory) != expected:
            raise ValueError(
                f"WinCLIP+ memories {sorted(self._memory)} do not match scales {self.scales}"
            )
