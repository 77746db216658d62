"""MetaUAS: anomaly segmentation as change segmentation against one normal prompt image.

Gao, "MetaUAS: Universal Anomaly Segmentation with One-Prompt Meta-Learning" (NeurIPS 2024,
arXiv 2505.09265). Implemented from the method spec; parity with the official code is checked
on recorded fixtures (``tests/unit/test_metauas_parity.py``).

A pure-vision network (frozen EfficientNet-B4, feature alignment, UNet decoder) compares a query
with ONE normal prompt image of the same kind and outputs a per-pixel change probability at
S x S, used as the anomaly map. ``fit(k >= 1 normal images)`` keeps the prompts (and their
encoder features); ``predict`` pairs each query with one of them:

* ``prompt="seed"`` (MetaUAS, the official one-prompt protocol): one prompt drawn from the k by
  ``seed``, the same for every query;
* ``prompt="best"`` (MetaUAS★): per query, the prompt whose encoder feature map is most similar
  (cosine of the flattened, L2-normalised f5 maps; the official retrieval rule is unknown, its
  lists were precomputed).

``predict_pairs(images, references)`` scores explicit (query, reference) pairs without ``fit``.

The paper's own prompts are the official list files; ``anomalens benchmark --prompt-list`` reads
them (:mod:`anomalens.data.prompt_lists`): per class they replace the k-shot draw, per query each
image is scored with ``predict_pairs`` against its listed prompt.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.data.io import ImageLike, as_rgb_array
from anomalens.detectors._metauas_checkpoint import (
    config_from_metadata,
    load_metauas_checkpoint,
    save_metauas_checkpoint,
)
from anomalens.detectors._metauas_modules import (
    ALIGNED_LEVELS,
    AlignmentType,
    FusionPolicy,
    MetaUASConfig,
    MetaUASNet,
)
from anomalens.detectors.base import Detector
from anomalens.registry import register_detector
from anomalens.types import LearningType, Prediction

__all__ = ["MetaUAS", "joint_minmax_scores", "load_images", "retrieval_descriptors"]

PromptPolicy = Literal["seed", "best"]
ImageScore = Literal["max", "class_minmax"]

#: Working size of the released checkpoints, by catalogue / file name.
_RELEASED_SIZES = {"metauas-256": 256, "metauas-512": 512}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_images(
    images: Sequence[ImageLike], size: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The official preprocessing up to the normalisation (done inside the network).

    Each image: RGB uint8 -> float / 255 -> bilinear resize to (size, size) with
    ``align_corners=True`` and no antialiasing (a squash; unchanged when already that size).

    Returns:
        (B, 3, size, size) float32 in [0, 1] on ``device``.
    """
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=device)
    for i, im in enumerate(images):
        x = (
            torch.from_numpy(np.require(as_rgb_array(im), requirements="W"))
            .to(device)
            .permute(2, 0, 1)
            .float()
            / 255.0
        )
        if x.shape[1:] != (size, size):
            x = F.interpolate(x[None], (size, size), mode="bilinear", align_corners=True)[0]
        out[i] = x
    return out


def joint_minmax_scores(maps: torch.Tensor) -> torch.Tensor:
    """The official test score: maps normalised together, then each image's maximum.

    ``m' = (m - min) / (max - min)`` with min and max over every pixel of every map given (the
    official test script passes one class's whole test set), then ``max`` per image. Monotonic,
    so per-class metrics equal those of the raw maximum; but one image's score depends on the
    other images. When all maps are constant the scores are 0 (the official code divides 0 by 0).

    Args:
        maps: (B, H, W) anomaly maps of one class.

    Returns:
        (B,) scores in [0, 1].
    """
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"maps must be (B, H, W) with B >= 1, got {tuple(maps.shape)}")
    lo, hi = maps.min(), maps.max()
    peak = maps.flatten(1).amax(dim=1)
    if hi <= lo:
        return torch.zeros_like(peak)
    # the rounding of (x - lo) / (hi - lo) is monotonic: its max is the max's image
    return (peak - lo) / (hi - lo)


def retrieval_descriptors(f5: torch.Tensor) -> torch.Tensor:
    """Descriptor for MetaUAS★ prompt retrieval: the flattened f5 map, L2-normalised.

    Our choice (the official retrieval is unknown): the deepest feature map keeps both the
    appearance and the layout (pose, position) of the image, so the best prompt is the normal
    image that looks most alike *where* it matters for the alignment.

    Args:
        f5: (B, 448, S/32, S/32) encoder features.

    Returns:
        (B, 448 * (S/32)^2) unit vectors; cosine similarity = dot product.
    """
    return F.normalize(f5.float().flatten(1), dim=1)


@register_detector("metauas")
class MetaUAS(Detector):
    """MetaUAS: one normal prompt image per query, change segmentation as the anomaly map.

    Args:
        checkpoint: weights: a catalogue name (``"metauas-256"``, ``"metauas-512"``), an official
            ``.ckpt`` state dict or our safetensors file. None = random weights (warns).
        image_size: working size S (a multiple of 32). Default: from our file's metadata, else
            512 for a ``metauas-512`` name or file, else 256. The two released checkpoints are
            separate models trained at 256 and 512.
        prompt: ``"seed"`` (one prompt drawn from the k by ``seed``, official protocol) or
            ``"best"`` (per query the most similar of the k, MetaUAS★).
        seed: seed of the ``"seed"`` draw and of the random initialisation.
        image_score: ``"max"`` (raw maximum of the map; each image's score is independent of
            the other images) or ``"class_minmax"`` (the official test score: the maps of one
            ``predict`` call normalised together, see ``joint_minmax_scores``).
        alignment: ``"sa"`` (official), ``"ha"`` or ``"na"`` (random weights only: the released
            checkpoints are ``"sa"``).
        fusion: ``"cat"`` (official), ``"add"`` or ``"absdiff"`` (likewise).
        device: torch device.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 needs a GPU).
        batch_size: pairs per forward pass.
        return_extras: also return the logits in ``Prediction.extras``.
    """

    learning_type = LearningType.FEW_SHOT
    default_threshold = 0.5  # maps and scores are change probabilities in [0, 1]

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        image_size: int | None = None,
        prompt: PromptPolicy = "seed",
        seed: int = 0,
        image_score: ImageScore = "max",
        alignment: AlignmentType = "sa",
        fusion: FusionPolicy = "cat",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        batch_size: int = 16,
        return_extras: bool = False,
    ) -> None:
        super().__init__(device)
        if prompt not in ("seed", "best"):
            raise ValueError(f"prompt must be 'seed' or 'best', got {prompt!r}")
        if image_score not in ("max", "class_minmax"):
            raise ValueError(f"image_score must be 'max' or 'class_minmax', got {image_score!r}")
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}, got {precision!r}")
        if precision == "fp16" and self.device.type == "cpu":
            raise ValueError("precision 'fp16' needs a GPU device; use 'bf16' on the CPU")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.prompt = prompt
        self.seed = int(seed)
        self.image_score = image_score
        self.precision = precision
        self.batch_size = int(batch_size)
        self.return_extras = return_extras
        #: the official score needs every image of a class in one predict call
        self.scores_whole_batch = image_score == "class_minmax"
        self.checkpoint_path: str | None = None
        self.weights_source = "untrained"

        state: dict[str, torch.Tensor] | None = None
        stored: dict[str, Any] = {}
        if checkpoint is not None:
            from anomalens.backbones.weights import resolve_weights

            path = resolve_weights(checkpoint)
            state, metadata = load_metauas_checkpoint(path)
            stored = config_from_metadata(metadata)
            self.checkpoint_path = str(path)
            self.weights_source = "anomalens" if stored else "official"
            if image_size is None:
                image_size = int(
                    stored.get("image_size")  # type: ignore[call-overload]
                    or _RELEASED_SIZES.get(
                        Path(str(checkpoint)).stem, _RELEASED_SIZES.get(path.stem, 256)
                    )
                )
            for name, value in (("alignment", alignment), ("fusion", fusion)):
                if name in stored and stored[name] != value:
                    raise ValueError(
                        f"MetaUAS checkpoint {path} was built with {name}={stored[name]!r}, "
                        f"not {value!r}"
                    )
        self.image_size = int(image_size or 256)
        self.net_config = MetaUASConfig(self.image_size, alignment, fusion)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = MetaUASNet(self.net_config)
        if state is not None:
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ValueError(
                    f"MetaUAS checkpoint {self.checkpoint_path} does not fit the network "
                    f"(alignment={alignment!r}, fusion={fusion!r}): {exc}"
                ) from exc
        else:
            warnings.warn(
                f"MetaUAS has random weights (seed {self.seed}): maps are not meaningful; pass "
                "checkpoint='metauas-256' (or a .ckpt / .safetensors file) or train one with "
                "`anomalens train metauas`",
                UserWarning,
                stacklevel=2,
            )
        self.net = net.to(self.device).eval()
        self._prompt_feats: list[torch.Tensor] = []
        self._prompt_desc: torch.Tensor | None = None
        self.prompt_index: int | None = None

    # ------------------------------------------------------------------------------ model
    def _autocast(self) -> Any:
        return torch.autocast(
            self.device.type, dtype=_DTYPES[self.precision], enabled=self.precision != "fp32"
        )

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> encoder features [f1..f5] (see ``MetaUASNet.encode``)."""
        with self._autocast():
            return self.net.encode(images.to(self.device))

    def _maps(
        self, query_feats: list[torch.Tensor], prompt_feats: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Change logits (B, S, S) for encoded queries and their prompts, float32."""
        full: list[torch.Tensor] = list(query_feats)
        for lvl in ALIGNED_LEVELS:  # the prompt enters only at the aligned levels
            full[lvl] = prompt_feats[lvl]
        with self._autocast():
            logits = self.net.decode(query_feats, full)
        return logits[:, 0].float()

    def _scores(self, maps: torch.Tensor) -> torch.Tensor:
        if self.image_score == "class_minmax":
            return joint_minmax_scores(maps)
        return maps.flatten(1).amax(dim=1)

    # ---------------------------------------------------------------------------- prompts
    def _fit(self, normal_images: list[ImageLike]) -> None:
        self._prompt_feats, self._prompt_desc, self.prompt_index = [], None, None
        chunks: list[list[torch.Tensor]] = []
        for start in range(0, len(normal_images), self.batch_size):
            x = load_images(normal_images[start : start + self.batch_size], self.image_size)
            chunks.append(self.encode(x))
        # only the aligned levels of a prompt are ever used: keep those (f1, f2 as empty)
        feats = [torch.cat([c[i] for c in chunks]) for i in range(5)]
        self._prompt_feats = [f if i in ALIGNED_LEVELS else f[:, :0] for i, f in enumerate(feats)]
        if self.prompt == "best":
            self._prompt_desc = retrieval_descriptors(feats[4])
        else:
            rng = np.random.default_rng(self.seed)
            self.prompt_index = int(rng.integers(len(normal_images)))

    def select_prompts(self, query_f5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt index per query under the prompt policy.

        Args:
            query_f5: (B, 448, S/32, S/32) query features.

        Returns:
            (indices (B,) into the fitted prompts, cosine similarity (B,) to the chosen prompt,
            NaN under ``prompt="seed"``).
        """
        b = query_f5.shape[0]
        if self._prompt_desc is None:
            assert self.prompt_index is not None
            idx = torch.full((b,), self.prompt_index, dtype=torch.long, device=query_f5.device)
            return idx, torch.full((b,), float("nan"), device=query_f5.device)
        sim = retrieval_descriptors(query_f5) @ self._prompt_desc.T
        best = sim.max(dim=1)
        return best.indices, best.values

    def _predict(self, images: list[ImageLike]) -> Prediction:
        maps, chosen, sims, logits_all = [], [], [], []
        for start in range(0, len(images), self.batch_size):
            x = load_images(images[start : start + self.batch_size], self.image_size, self.device)
            qf = self.encode(x)
            idx, sim = self.select_prompts(qf[4])
            logits = self._maps(qf, [f[idx] for f in self._prompt_feats])
            maps.append(torch.sigmoid(logits))
            chosen.append(idx)
            sims.append(sim)
            if self.return_extras:
                logits_all.append(logits)
        anomaly = torch.cat(maps)
        extras = {
            "prompt_index": torch.cat(chosen).cpu(),
            "prompt_similarity": torch.cat(sims).float().cpu(),
        }
        if self.return_extras:
            extras["logits"] = torch.cat(logits_all).cpu()
        return Prediction(self._scores(anomaly), anomaly, extras)

    def predict_pairs(
        self, images: Sequence[ImageLike], references: Sequence[ImageLike]
    ) -> Prediction:
        """Score each image against its own reference (no ``fit`` needed).

        Both are squashed to S x S independently (the official preprocessing), so a reference
        of another size is accepted.

        Args:
            images: B query images.
            references: B normal references, ``references[i]`` for ``images[i]``.

        Returns:
            Prediction with image_score (B,) and anomaly_map (B, S, S), float32 on the CPU.
        """
        images, references = list(images), list(references)
        if not images:
            raise ValueError("predict_pairs() got no image")
        if len(images) != len(references):
            raise ValueError(
                f"predict_pairs() got {len(images)} images but {len(references)} references"
            )
        maps, logits_all = [], []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                stop = start + self.batch_size
                q = self.encode(load_images(images[start:stop], self.image_size, self.device))
                p = self.encode(load_images(references[start:stop], self.image_size, self.device))
                logits = self._maps(q, p)
                maps.append(torch.sigmoid(logits))
                if self.return_extras:
                    logits_all.append(logits)
            anomaly = torch.cat(maps)
            scores = self._scores(anomaly)
        extras = {"logits": torch.cat(logits_all).cpu()} if self.return_extras else {}
        return Prediction(scores.float().cpu(), anomaly.float().cpu(), extras)

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the network as safetensors (architecture settings in the metadata)."""
        return save_metauas_checkpoint(
            path, self.net.state_dict(), self.net_config, extra={"source": self.weights_source}
        )

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(
            {
                "checkpoint": self.checkpoint_path,
                "weights": self.weights_source,
                "prompt": self.prompt,
                "prompt_index": self.prompt_index,
                "seed": self.seed,
                "image_score": self.image_score,
                "alignment": self.net_config.alignment,
                "fusion": self.net_config.fusion,
                "precision": self.precision,
            }
        )
        return cfg
