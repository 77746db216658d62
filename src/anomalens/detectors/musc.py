"""MuSc: zero-shot anomaly detection by mutual scoring of a batch of unlabeled test images.

Li et al., "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation with Mutual
Scoring of the Unlabeled Images", ICLR 2024. No normal image and no prompt: the test images of
one category are scored *against each other* (a normal patch finds close matches in most other
images, an anomalous one only in few). ``predict(images)`` therefore needs the whole batch at
once; the result for an image depends on the other images of the batch.

Pipeline: patch tokens of several layers (:class:`PatchFeatureExtractor`) -> LNAMD with
degrees r -> MSM per (layer, r) -> mean -> bilinear upsampling (align_corners=True) -> image
score = max of the map -> RsCIN re-scoring of the image scores over global embeddings. The pure
tensor stages live in :mod:`anomalens.scoring.musc`.

Backbones: CLIP ViTs through :class:`~anomalens.backbones.clip.ClipBackbone` (default
``ViT-L-14-336`` at 518 px with the official MuSc settings), the CNN presets of
:mod:`anomalens.backbones.presets`, or any object implementing :class:`PatchFeatureExtractor`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anomalens.backbones.clip_build import musc_clip_backbone
from anomalens.backbones.patch_features import ClipPatchExtractor, CnnPatchExtractor
from anomalens.backbones.protocol import PatchFeatureExtractor, PatchFeatures
from anomalens.data.io import ImageLike
from anomalens.detectors.base import Detector
from anomalens.registry import register_detector
from anomalens.scoring.musc import (
    MIN_IMAGES_FOR_DEFAULT_INTERVAL,
    divide_subsets,
    fuse_scores,
    interval_bounds,
    lnamd,
    max_scores,
    mutual_scores,
    rscin,
    upsample_maps,
)
from anomalens.types import LearningType, Prediction

if TYPE_CHECKING:
    from anomalens.backbones.clip import ClipBackbone

__all__ = [
    "ClipPatchExtractor",
    "CnnPatchExtractor",
    "MuSc",
    "PatchFeatureExtractor",
    "PatchFeatures",
    "musc_clip_backbone",
    "musc_cost",
    "musc_shard_cost",
]

log = logging.getLogger(__name__)

#: Working size of CLIP backbones given by name (the official MuSc setting).
CLIP_DEFAULT_SIZE = 518
#: Nominal float32 rates for the time estimate (multiply-adds x 2 per second): per CPU thread
#: and per GPU. Real speed varies by a factor of about 3 either way.
_CPU_FLOPS_PER_THREAD = 1e10
_GPU_FLOPS = 1e13


def musc_cost(
    subset_sizes: Sequence[int],
    layer_shapes: Sequence[tuple[int, int]],
    num_r: int,
    feature_bytes: int,
    msm_bytes: int,
    image_size: int,
    backbone_flops_per_image: float,
) -> dict[str, float]:
    """Work and memory of one MuSc batch, from shapes only (nothing is run).

    Args:
        subset_sizes: images per subset scored together (``divide_num`` subsets).
        layer_shapes: per tapped layer, (tokens L, channels C) of one image.
        num_r: number of LNAMD degrees.
        feature_bytes: bytes per stored token value (``feature_dtype``).
        msm_bytes: bytes per LNAMD feature value in the neighbour search (``msm_dtype``).
        image_size: working size S (maps are S x S float32).
        backbone_flops_per_image: floating-point operations of one backbone forward.

    Returns:
        ``flops`` (backbone + MSM), ``msm_flops`` and ``memory_bytes`` (tokens of the largest
        subset, one LNAMD feature block, the float32 maps and float64 patch maps of the batch).
    """
    n = int(sum(subset_sizes))
    biggest = max(subset_sizes) if subset_sizes else 0
    pairs = float(sum(m * m for m in subset_sizes))
    msm = 2.0 * num_r * pairs * sum(float(L) * L * C for L, C in layer_shapes)
    tokens = biggest * sum(L * C for L, C in layer_shapes) * feature_bytes
    lnamd_block = biggest * max((L * C for L, C in layer_shapes), default=0) * msm_bytes
    finest = max((L for L, _ in layer_shapes), default=0)
    maps = n * (image_size * image_size * 4 + finest * 8 * (num_r + 1))
    return {
        "flops": msm + n * backbone_flops_per_image,
        "msm_flops": msm,
        "memory_bytes": float(tokens + lnamd_block + maps),
    }


def musc_shard_cost(
    shard_size: int,
    num_images: int,
    layer_shapes: Sequence[tuple[int, int]],
    num_r: int,
    feature_bytes: int,
    msm_bytes: int,
    image_size: int,
    chunk: int | None,
    topmin_max: float = 0.3,
) -> dict[str, float]:
    """Memory of one worker scoring one shard of a sharded MuSc batch, and the data it moves.

    The scoring stage of ``predict --engine ray`` (see ``anomalens.distributed.musc_shards``)
    holds, for a shard of ``s`` query images of a batch of N, one (layer, r) at a time: the
    tokens and LNAMD features of the shard and of one reference shard; for every query patch
    the ``hi`` ~ ``topmin_max * (N - 1)`` smallest per-image NN distances (float32), plus
    the merge of one block; one (c * L, c * L) distance block; the MSM scores of every
    (r, layer); and float64 upsampling in slices of 16 images. The model itself is not
    included.

    Args:
        shard_size: s, images per shard.
        num_images: N, images scored together (one subset with ``divide_num``).
        layer_shapes: per tapped layer, (tokens L, channels C) of one image.
        num_r: number of LNAMD degrees.
        feature_bytes: bytes per stored token value (``feature_dtype``).
        msm_bytes: bytes per LNAMD feature value (``msm_dtype``).
        image_size: working size S.
        chunk: images per query / reference block (``chunk_size``; None = the shard).
        topmin_max: upper end of MSM's interval (fraction of N - 1, or a count if >= 1).

    Returns:
        ``memory_bytes`` (peak of one worker), ``kept_bytes`` (the kept distances alone),
        ``features_bytes`` (tokens of the whole batch: written once, to the work folder) and
        ``read_bytes`` (what one shard's scoring reads: every shard's tokens once per r).
    """
    s = int(shard_size)
    c = s if chunk is None else min(int(chunk), s)
    hi = max(1, int(topmin_max * (num_images - 1)) if topmin_max < 1 else int(topmin_max))
    per_image = sum(L * C for L, C in layer_shapes)
    big_l, big_c = max(layer_shapes, key=lambda lc: lc[0] * lc[1])
    finest = max(L for L, _ in layer_shapes)
    tokens = 2 * s * big_l * big_c * feature_bytes  # the shard's and one reference shard's
    lnamd = 2 * s * big_l * big_c * msm_bytes
    kept = s * big_l * hi * 4
    merge = c * big_l * (2 * hi + 2 * c) * 4
    block = (c * big_l) ** 2 * 4
    scores = s * finest * (4 * num_r * len(layer_shapes) + 8 * (num_r + 1))
    maps = 16 * image_size * image_size * 12
    features = num_images * per_image * feature_bytes
    return {
        "memory_bytes": float(tokens + lnamd + kept + merge + block + scores + maps),
        "kept_bytes": float(kept),
        "features_bytes": float(features),
        "read_bytes": float(num_r * features),
    }


def _available_memory(device: torch.device) -> float | None:
    """Bytes free on ``device`` now (CUDA: free device memory; CPU: available RAM), or None."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _native_clip_size(model_name: str) -> int | None:
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if not cfg:
        return None
    size = cfg.get("vision_cfg", {}).get("image_size")
    return int(size) if isinstance(size, int) else None


def _default_size(backbone: object) -> int:
    """Working size for ``image_size=None``: a given backbone's own, a CNN preset's native input
    size, else MuSc's official 518 px for CLIP."""
    from anomalens.backbones.clip import ClipBackbone
    from anomalens.backbones.presets import CNN_PRESETS

    if isinstance(backbone, str) and backbone in CNN_PRESETS:
        return int(CNN_PRESETS[backbone].input_size)
    if isinstance(backbone, ClipBackbone):
        return int(backbone.image_size)
    if isinstance(backbone, ClipPatchExtractor):
        return int(backbone.backbone.image_size)
    if isinstance(backbone, CnnPatchExtractor):
        return int(backbone.model.preset.input_size)
    return CLIP_DEFAULT_SIZE


def _parent_folder(image: ImageLike) -> str:
    """Group label of an image given as a path (its folder name); "" for in-memory images."""
    return Path(image).parent.name if isinstance(image, (str, Path)) else ""


def _subset_of_image(subsets: list[list[int]], n: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.int64)
    for t, subset in enumerate(subsets):
        out[subset] = t
    return out


@register_detector("musc")
class MuSc(Detector):
    """MuSc (ICLR 2024): batched zero-shot detection by mutual scoring of unlabeled images.

    ``fit(None)`` is a no-op; ``predict(images)`` scores the batch against itself (give it all
    test images of one category at once: results depend on the batch). At least 2 images are
    needed; with fewer than 5 the default interval (smallest 30 % of the N - 1 per-image
    distances) would be empty, so the smallest distance alone is used and a warning is issued
    (the official code gives NaN there).

    Args:
        backbone: a CLIP architecture name (``"ViT-L-14-336"``, ``"ViT-B-16"``...), a CNN preset
            name (``"mobilenet_v2_tf"``, ``"wide_resnet50_2"``...), a built ``ClipBackbone``, or
            any :class:`PatchFeatureExtractor`.
        pretrained: CLIP weights (open_clip tag, file, ``hf-hub:`` id; None = random).
        weights: CNN weights (see ``create_cnn_backbone``; ignored for CLIP).
        image_size: working size S (maps are S x S). None = 518 for CLIP backbones (official
            default), the preset's native input size for CNN presets (224; 380 for
            EfficientNet-B4), a given backbone's own size.
        layers: CLIP: 1-based blocks (default 6, 12, 18, 24); CNN: module names (default: the
            preset's layers).
        r: LNAMD degrees (odd).
        topmin: MSM interval [min, max) of the sorted per-image NN distances (fractions of N-1).
        k_list: RsCIN neighbourhood sizes (MVTec 1, 2, 3; VisA 1, 8, 9; containing 0 disables).
        quick_gelu: CLIP MLP activation. None = as the official MuSc code: with OpenAI
            weights QuickGELU only at the model's native size, plain GELU otherwise (what
            produced the published 518-px numbers); other weights: the tag's / config's.
        chunk_size: images per query / reference block of MSM (bounds memory: one
            (chunk * L, chunk * L) distance block and a (chunk, L, N) NN matrix at a time).
            None = the whole batch in one block.
        batch_size: images per backbone forward.
        feature_dtype: storage dtype of the per-layer tokens of the whole batch
            (``"float16"`` halves the memory; computation stays float32).
        divide_num: split the batch into this many stratified subsets scored separately
            (the official mechanism for big test sets: MSM cost and feature memory fall by
            about ``divide_num``, and each image is compared with the images of its own subset
            only). Subsets are stratified by the ``groups`` given to ``predict`` (the
            defect-type folder in ``benchmark``; the parent folder in ``anomalens predict``)
            exactly as the official code (:func:`~anomalens.scoring.musc.divide_subsets`).
            RsCIN always runs once on the whole batch. 1 = the whole batch at once (default,
            the setting of the published numbers).
        divide_seed: seed of the subset shuffle (the official script: 42).
        msm_dtype: dtype of MSM's neighbour search. ``"float32"`` (default) = ``torch.cdist``
            in float32 as the official code. ``"bfloat16"`` / ``"float16"`` = each nearest
            neighbour is searched with half-precision dot products of the unit LNAMD features
            (stored in that dtype, halving their memory) and its distance recomputed in
            float32: faster where the channels are many (CLIP: 1024) on GPU tensor cores or a
            CPU with AVX512-BF16 (use ``float16`` on GPU, ``bfloat16`` on CPU); only the choice
            of near-tied neighbours can differ (see ``docs/methods/musc.md``).
        precision: CLIP backbone precision (``"fp32"``, ``"fp16"``, ``"bf16"``; None = fp32, or a
            given ``ClipBackbone``'s own). The official code runs the backbone under fp16
            autocast on GPU; tokens are stored as ``feature_dtype`` and LNAMD runs in float32.
            CNN backbones and custom extractors run as built (only None / ``"fp32"``).
        progress: progress bar over the mutual scoring (the long part: N images x
            len(r) x layers); None = only when stderr is a terminal.
        device: torch device.
        budget_s: refuse a batch whose estimated time exceeds this many seconds (the
            estimate, from the backbone's shapes and the batch size, is logged before every
            batch; rough, within a factor of about 3).
        budget_gb: refuse a batch whose estimated memory exceeds this many GiB (None = 90 %
            of the memory free on the device when the batch starts).
        force: score a batch over budget anyway (a warning instead of the refusal).
    """

    learning_type = LearningType.BATCH_ZERO_SHOT
    uses_normal_images = False
    scores_whole_batch = True
    min_batch = 2
    backbone_kind = "clip"  # CNN presets are accepted too

    def __init__(
        self,
        backbone: str | ClipBackbone | PatchFeatureExtractor = "ViT-L-14-336",
        pretrained: str | None = "openai",
        weights: str | None = None,
        image_size: int | None = None,
        layers: Sequence[int] | Sequence[str] | None = None,
        r: Sequence[int] = (1, 3, 5),
        topmin: tuple[float, float] = (0.0, 0.3),
        k_list: Sequence[int] = (1, 2, 3),
        quick_gelu: bool | None = None,
        chunk_size: int | None = 8,
        batch_size: int = 4,
        feature_dtype: str = "float32",
        divide_num: int = 1,
        divide_seed: int = 42,
        msm_dtype: str = "float32",
        precision: str | None = None,
        progress: bool | None = None,
        device: str | torch.device = "cpu",
        budget_s: float = 3600.0,
        budget_gb: float | None = None,
        force: bool = False,
    ) -> None:
        super().__init__(device=device)
        if budget_s <= 0 or (budget_gb is not None and budget_gb <= 0):
            raise ValueError(f"budget_s and budget_gb must be > 0, got {budget_s}, {budget_gb}")
        self.budget_s = float(budget_s)
        self.budget_gb = None if budget_gb is None else float(budget_gb)
        self.force = bool(force)
        self._shapes: tuple[list[tuple[int, int]], float] | None = None
        if not r or any(int(v) < 1 or int(v) % 2 == 0 for v in r):
            raise ValueError(f"r must be a non-empty list of odd integers >= 1, got {list(r)}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if msm_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"msm_dtype must be float32, float16 or bfloat16, got {msm_dtype!r}")
        if int(divide_num) < 1:
            raise ValueError(f"divide_num must be >= 1, got {divide_num}")
        if feature_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(
                f"feature_dtype must be float32, float16 or bfloat16, got {feature_dtype!r}"
            )
        self.image_size = int(image_size if image_size is not None else _default_size(backbone))
        self.r = tuple(int(v) for v in r)
        self.topmin = (float(topmin[0]), float(topmin[1]))
        interval_bounds(10, *self.topmin)  # validates the interval early
        self.k_list = tuple(int(k) for k in k_list)
        self.chunk_size = chunk_size
        self.batch_size = int(batch_size)
        self.feature_dtype = getattr(torch, feature_dtype)
        self.divide_num = int(divide_num)
        self.divide_seed = int(divide_seed)
        self.msm_dtype = getattr(torch, msm_dtype)
        self.progress = progress
        if precision not in (None, "fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        self.extractor = self._build_extractor(
            backbone, pretrained, weights, layers, quick_gelu, precision
        )

    # ---------------------------------------------------------------------- cost estimate
    def _layer_shapes(self) -> tuple[list[tuple[int, int]], float]:
        """Per tapped layer (tokens, channels) of one image, and backbone FLOPs per image.

        CLIP: from the architecture. Other backbones: one forward of a blank image (cheap
        for CNNs), FLOPs from the parameter count times the finest grid.
        """
        if self._shapes is not None:
            return self._shapes
        if isinstance(self.extractor, ClipPatchExtractor):
            bb = self.extractor.backbone
            tokens = (self.image_size // int(bb.patch_size)) ** 2
            width = int(bb.vision_width)
            params = sum(p.numel() for p in bb.model.visual.parameters())
            flops = 2.0 * params * (tokens + 1) + 4.0 * int(bb.num_layers) * tokens**2 * width
            shapes = [(tokens, width)] * len(self.extractor.layers)
        else:
            x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
            with torch.no_grad():
                out = self.extractor.extract(x)
            shapes = [(int(t.shape[1]), int(t.shape[2])) for t in out.tokens]
            module = getattr(self.extractor, "model", self.extractor)
            params = (
                sum(p.numel() for p in module.parameters())
                if isinstance(module, torch.nn.Module)
                else 0
            )
            flops = 2.0 * params * max(L for L, _ in shapes)
        self._shapes = (shapes, flops)
        return self._shapes

    def estimate_cost(self, subset_sizes: Sequence[int]) -> dict[str, float]:
        """Rough time (s) and memory (GiB) of scoring subsets of these sizes.

        Returns:
            ``seconds``, ``memory_gb``, ``budget_s``, ``budget_gb`` (None: unknown free memory).
        """
        shapes, bb_flops = self._layer_shapes()
        cost = musc_cost(
            subset_sizes,
            shapes,
            len(self.r),
            self.feature_dtype.itemsize,
            self.msm_dtype.itemsize,
            self.image_size,
            bb_flops,
        )
        rate = (
            _GPU_FLOPS
            if self.device.type == "cuda"
            else _CPU_FLOPS_PER_THREAD * max(1, torch.get_num_threads())
        )
        free = _available_memory(self.device)
        budget_gb = (
            self.budget_gb
            if self.budget_gb is not None
            else (None if free is None else 0.9 * free / 2**30)
        )
        return {
            "seconds": cost["flops"] / rate,
            "memory_gb": cost["memory_bytes"] / 2**30,
            "budget_s": self.budget_s,
            "budget_gb": budget_gb,  # type: ignore[dict-item]
        }

    def estimate_shard_cost(self, shard_size: int, num_images: int) -> dict[str, float]:
        """Per-worker memory and data moved when a batch is scored in shards (``--engine ray``).

        See :func:`musc_shard_cost`; ``num_images`` is the largest subset (``divide_num``).
        """
        shapes, _ = self._layer_shapes()
        return musc_shard_cost(
            shard_size,
            num_images,
            shapes,
            len(self.r),
            self.feature_dtype.itemsize,
            self.msm_dtype.itemsize,
            self.image_size,
            self.chunk_size,
            self.topmin[1],
        )

    def _check_budget(self, subset_sizes: Sequence[int]) -> None:
        """Log the estimate of a batch; refuse it above the budget unless ``force``."""
        est = self.estimate_cost(subset_sizes)
        n = sum(subset_sizes)
        what = (
            f"MuSc on {n} images ({len(subset_sizes)} subset(s)) with "
            f"{self.extractor.describe().get('backbone', type(self.extractor).__name__)} at "
            f"{self.image_size} px on {self.device}: about {est['seconds'] / 60:.1f} min and "
            f"{est['memory_gb']:.2f} GiB (rough estimate)"
        )
        over = []
        if est["seconds"] > est["budget_s"]:
            over.append(f"time budget {est['budget_s']:.0f} s")
        if est["budget_gb"] is not None and est["memory_gb"] > est["budget_gb"]:
            over.append(f"memory budget {est['budget_gb']:.2f} GiB")
        if not over:
            (log.warning if est["seconds"] > 60 else log.info)("%s", what)
            return
        advice = (
            f"{what} exceeds the {' and the '.join(over)}: split the batch (--option "
            "divide_num=4), lower the working size (--image-size), store features as "
            "--option feature_dtype=float16, use a GPU (--device cuda), raise --option "
            "budget_s=SECONDS / budget_gb=GIB, or run anyway with --option force=true"
        )
        if not self.force:
            raise ValueError(advice)
        warnings.warn(advice.replace("or run anyway with", "running anyway:"), stacklevel=4)

    # ---------------------------------------------------------------------- construction
    def _build_extractor(
        self,
        backbone: str | ClipBackbone | PatchFeatureExtractor,
        pretrained: str | None,
        weights: str | None,
        layers: Sequence[int] | Sequence[str] | None,
        quick_gelu: bool | None,
        precision: str | None,
    ) -> PatchFeatureExtractor:
        from anomalens.backbones.clip import ClipBackbone
        from anomalens.backbones.presets import CNN_PRESETS

        is_clip = isinstance(backbone, ClipBackbone) or (
            isinstance(backbone, str) and backbone not in CNN_PRESETS
        )
        if not is_clip and precision not in (None, "fp32"):
            raise ValueError(
                f"precision={precision!r} applies to CLIP backbones; a CNN preset or a custom "
                "feature extractor runs as built"
            )
        if isinstance(backbone, PatchFeatureExtractor):
            if layers is not None:
                raise ValueError("layers= is set by the given feature extractor, not by MuSc")
            return backbone
        if not isinstance(backbone, str):
            ext = ClipPatchExtractor(backbone, layers)  # type: ignore[arg-type]
            if ext.backbone.image_size != self.image_size:
                raise ValueError(
                    f"image_size={self.image_size} differs from the ClipBackbone's input size "
                    f"{ext.backbone.image_size}; pass image_size={ext.backbone.image_size} or "
                    "build the backbone at the wanted size (musc_clip_backbone)"
                )
            if precision is not None and precision != ext.backbone.precision:
                raise ValueError(
                    f"precision={precision!r} differs from the given ClipBackbone's "
                    f"{ext.backbone.precision!r}; build it with that precision or leave "
                    "precision unset"
                )
            ext.backbone.to(self.device)
            return ext
        if backbone in CNN_PRESETS:
            from anomalens.backbones.cnn import cnn_extractor

            names = [str(v) for v in layers] if layers is not None else None
            return CnnPatchExtractor(
                cnn_extractor(backbone, weights=weights, layers=names, device=self.device)
            )
        import open_clip

        if backbone not in open_clip.list_models():
            raise ValueError(
                f"unknown MuSc backbone {backbone!r}: expected a CLIP model name "
                f"(e.g. ViT-L-14-336, ViT-B-16) or a CNN preset ({', '.join(sorted(CNN_PRESETS))})"
            )
        if quick_gelu is None and pretrained == "openai":
            quick_gelu = _native_clip_size(backbone) == self.image_size
        native = ClipBackbone.create(
            backbone, pretrained=pretrained, image_size=None, force_quick_gelu=quick_gelu
        )
        clip = musc_clip_backbone(
            native, self.image_size, device=self.device, precision=precision or "fp32"
        )
        int_layers = [int(v) for v in layers] if layers is not None else None
        return ClipPatchExtractor(clip, int_layers)

    # --------------------------------------------------------------------------- interface
    def _fit(self, normal_images: list[ImageLike]) -> None:
        """Nothing to learn: MuSc is zero-shot (``fit`` drops normal images with a warning)."""

    def _predict(self, images: list[ImageLike]) -> Prediction:
        return self._predict_grouped(images, None)

    def _predict_grouped(self, images: list[ImageLike], groups: list[str] | None) -> Prediction:
        n = len(images)
        if n < self.min_batch:
            raise ValueError(
                "MuSc needs a batch of unlabeled images scored against each other: predict() "
                f"got {n} image; pass all test images of a category at once (>= "
                f"{MIN_IMAGES_FOR_DEFAULT_INTERVAL} recommended)"
            )
        if groups is None:
            groups = [_parent_folder(im) for im in images]
        subsets = self.plan_subsets(groups, stacklevel=4)
        self._check_budget([len(s) for s in subsets])
        maps = torch.empty(n, self.image_size, self.image_size, dtype=torch.float32)
        raw = torch.empty(n, dtype=torch.float64)
        emb: torch.Tensor | None = None
        patch_maps: torch.Tensor | None = None
        for subset in subsets:
            feats = self.extract_features([images[i] for i in subset])
            sub_maps, sub_raw, sub_patch = self.score_features(feats.tokens, feats.grids)
            index = torch.tensor(subset)
            maps[index], raw[index] = sub_maps, sub_raw
            sub_emb = F.normalize(feats.embedding.float().cpu(), dim=-1)
            if emb is None or patch_maps is None:
                emb = sub_emb.new_empty(n, sub_emb.shape[1])
                patch_maps = sub_patch.new_empty(n, *sub_patch.shape[1:]).cpu()
            emb[index], patch_maps[index] = sub_emb, sub_patch.cpu()
            del feats
        assert emb is not None and patch_maps is not None
        score = rscin(raw, emb, self.k_list)
        return Prediction(
            image_score=score.float(),
            anomaly_map=maps,
            extras={
                "score_before_rscin": raw,
                "patch_map": patch_maps.float(),
                "subset": _subset_of_image(subsets, n),
            },
        )

    # ------------------------------------------------------------------------------ stages
    def plan_subsets(self, groups: Sequence[str], stacklevel: int = 2) -> list[list[int]]:
        """The subsets scored separately (``divide_num``), checked; empty subsets dropped.

        Args:
            groups: one group label per image of the batch (see ``divide_num``).
            stacklevel: of the small-subset warning.

        Returns:
            Lists of positions into the batch, in the official row order.

        Raises:
            ValueError: a subset of a single image.
        """
        subsets = [s for s in divide_subsets(groups, self.divide_num, self.divide_seed) if s]
        small = min(len(s) for s in subsets)
        if small < 2:
            raise ValueError(
                f"divide_num={self.divide_num} leaves a subset of 1 image out of {len(groups)} "
                "(MuSc scores each image against the other images of its subset); use a smaller "
                "divide_num"
            )
        if small < MIN_IMAGES_FOR_DEFAULT_INTERVAL:
            what = "only" if len(subsets) == 1 else f"a subset (divide_num={self.divide_num}) of"
            warnings.warn(
                f"MuSc got {what} {small} images: the interval average of the smallest "
                f"{self.topmin[1]:.0%} of the other images' distances is empty below "
                f"{MIN_IMAGES_FOR_DEFAULT_INTERVAL} images; using the nearest image only",
                stacklevel=stacklevel,
            )
        return subsets

    def extract_features(self, images: Sequence[ImageLike]) -> PatchFeatures:
        """Run the backbone over ``images`` in batches of ``batch_size``.

        Returns:
            PatchFeatures with tokens (N, L_l, C_l) stored as ``feature_dtype`` on the device.
        """
        tokens: list[list[torch.Tensor]] = []
        embs: list[torch.Tensor] = []
        grids: list[tuple[int, int]] = []
        for b0 in range(0, len(images), self.batch_size):
            x = self.extractor.preprocess(images[b0 : b0 + self.batch_size], self.image_size)
            out = self.extractor.extract(x.to(self.device))
            if not tokens:
                tokens = [[] for _ in out.tokens]
                grids = list(out.grids)
            for acc, t in zip(tokens, out.tokens):
                acc.append(t.to(self.feature_dtype))
            embs.append(out.embedding.float())
        return PatchFeatures([torch.cat(t) for t in tokens], grids, torch.cat(embs))

    def score_features(
        self, tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LNAMD + MSM + fusion + upsampling + image score for the whole batch.

        Args:
            tokens: per layer, (N, L_l, C_l) patch tokens.
            grids: per layer, (h_l, w_l).

        Returns:
            maps: (N, S, S) float32 pixel maps on the CPU (upsampled in float64);
            raw_scores: (N,) float64 max of each float64 map (before RsCIN), on the CPU;
            patch_maps: (N, h, w) float64 fused patch scores on the finest grid.
        """
        n = int(tokens[0].shape[0])
        per_r: list[list[torch.Tensor]] = []
        bar = tqdm(
            total=n * len(self.r) * len(tokens),
            desc="MuSc mutual scoring",
            unit="img",
            disable=None if self.progress is None else not self.progress,
            leave=False,
        )
        for r in self.r:
            per_layer: list[torch.Tensor] = []
            for feats, grid in zip(tokens, grids):
                z = self.lnamd_features(feats, grid, r)
                per_layer.append(
                    mutual_scores(
                        z,
                        *self.topmin,
                        self.chunk_size,
                        self.chunk_size,
                        compute_dtype=self.msm_dtype,
                        on_block=bar.update,
                    )
                )
                del z
            per_r.append(per_layer)
        bar.close()
        patch = self.fuse_patch_scores(per_r, grids)
        maps, raw = self.upsample_patch_scores(patch)
        return maps, raw, patch

    def lnamd_features(self, tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
        """LNAMD of one layer's tokens with degree ``r``, in slices of ``batch_size`` images.

        Args:
            tokens: (N, L, C) stored tokens (any float dtype; LNAMD runs in float32).
            grid: (h, w) with h * w = L.
            r: LNAMD degree.

        Returns:
            (N, L, C) unit vectors in ``msm_dtype``.
        """
        n = int(tokens.shape[0])
        return torch.cat(
            [
                lnamd(tokens[i : i + self.batch_size].float(), grid, r).to(self.msm_dtype)
                for i in range(0, n, self.batch_size)
            ]
        )

    def fuse_patch_scores(
        self, per_r: Sequence[Sequence[torch.Tensor]], grids: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """MSM scores of every (r, layer) fused on the finest grid.

        Args:
            per_r: per degree r (in ``self.r`` order), per layer, (N, L_l) MSM scores.
            grids: per layer, (h_l, w_l).

        Returns:
            (N, h, w) float64 fused patch scores on the finest grid.
        """
        target = max(grids, key=lambda g: g[0] * g[1])
        stacked: list[torch.Tensor] = []
        for per_layer in per_r:
            flat: list[torch.Tensor] = []
            for s, grid in zip(per_layer, grids):
                s = s.double().view(s.shape[0], *grid)
                if tuple(grid) != tuple(target):
                    s = upsample_maps(s, target)
                flat.append(s.flatten(1))
            stacked.append(torch.stack(flat))
        fused = fuse_scores(torch.stack(stacked))
        return fused.view(fused.shape[0], *target)

    def upsample_patch_scores(self, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel maps and image scores (before RsCIN) from fused patch scores.

        Args:
            patch: (N, h, w) float64 fused patch scores.

        Returns:
            maps: (N, S, S) float32 on the CPU (upsampled in float64);
            raw_scores: (N,) float64 max of each float64 map, on the CPU.
        """
        n = int(patch.shape[0])
        maps = torch.empty(n, self.image_size, self.image_size, dtype=torch.float32)
        raw = torch.empty(n, dtype=torch.float64)
        for i in range(0, n, 16):  # float64 upsampling in slices: bounded memory for big N
            up = upsample_maps(patch[i : i + 16], self.image_size)
            raw[i : i + 16] = max_scores(up).cpu()
            maps[i : i + 16] = up.float().cpu()
        return maps, raw

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(
            {
                "r": list(self.r),
                "topmin": list(self.topmin),
                "k_list": list(self.k_list),
                "chunk_size": self.chunk_size,
                "feature_dtype": str(self.feature_dtype).removeprefix("torch."),
                "divide_num": self.divide_num,
                "divide_seed": self.divide_seed,
                "msm_dtype": str(self.msm_dtype).removeprefix("torch."),
            }
        )
        cfg.update(self.extractor.describe())
        return cfg

    # --------------------------------------------------------------------------- model files
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Nothing: MuSc has no fitted state (a model file stores its settings only)."""
        return {}

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Nothing to restore: MuSc scores each batch against itself."""
        if tensors:
            raise ValueError(f"MuSc has no fitted state, got tensors {sorted(tensors)}")

    @classmethod
    def _backbone_option(cls, module: torch.nn.Module) -> Any:
        """A rebuilt CNN is wrapped as MuSc's feature extractor; a CLIP is taken as it is."""
        from anomalens.backbones.cnn import CNNFeatureExtractor

        return CnnPatchExtractor(module) if isinstance(module, CNNFeatureExtractor) else module
