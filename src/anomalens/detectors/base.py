"""The one detector interface every method implements."""

from __future__ import annotations

import abc
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from anomalens.data.io import ImageLike
from anomalens.types import LearningType, Prediction

__all__ = ["Detector", "NotFittedError"]


class NotFittedError(RuntimeError):
    """Raised when ``predict`` is called before a required ``fit``."""


class Detector(abc.ABC):
    """Base class of all anomaly detectors.

    Subclasses set ``learning_type`` and ``image_size`` (working size S: maps are (S, S)),
    the batch and fit facts below when they differ from the defaults, implement ``_fit`` and
    ``_predict``, and are registered with ``anomalens.registry.register_detector``.

    Callers never branch on the learning type: they ask the detector. ``fit`` drops normal
    images a method does not use, ``predict_batches`` / ``batch_slices`` split work the way the
    method needs (one call for batch methods), ``min_batch`` is the smallest batch it scores.

    Usage::

        det = create_detector("patchcore", weights="mobilenet_v2.safetensors")
        det.fit(normal_images, category="bottle")  # k normal images, or None (zero-shot)
        pred = det.predict(images)      # Prediction(image_score (B,), anomaly_map (B, S, S))
    """

    name: ClassVar[str] = "detector"
    learning_type: ClassVar[LearningType] = LearningType.FEW_SHOT
    # The three facts below default to what ``learning_type`` implies (``__init_subclass__``);
    # a method sets them only where it differs.
    #: fit() uses the normal images it is given (False: zero-shot methods ignore them).
    uses_normal_images: ClassVar[bool] = True
    #: predict() scores its images against each other: a result depends on the whole batch,
    #: so a folder is scored in one call (MuSc).
    #: (A method may set it per instance when an option makes its results batch-dependent.)
    scores_whole_batch: bool = False
    #: Smallest number of images one predict() call accepts.
    min_batch: ClassVar[int] = 1
    #: The category / object name given to fit() changes the results (text prompts).
    uses_category: ClassVar[bool] = False
    #: Kind of backbone ``create_detector`` builds for the method: "cnn", "clip" or None
    #: (the method builds its own network).
    backbone_kind: ClassVar[str | None] = None
    image_size: int = 224
    #: Threshold used when the user gives neither normal images nor a threshold: set by methods
    #: whose scores are anomaly probabilities in [0, 1] (0.5); None = no sensible default.
    default_threshold: ClassVar[float | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Derive the batch and fit facts from ``learning_type`` unless a class sets them."""
        super().__init_subclass__(**kwargs)
        lt = cls.learning_type
        own = cls.__dict__
        if "uses_normal_images" not in own:
            cls.uses_normal_images = lt in (LearningType.FEW_SHOT, LearningType.ZERO_OR_FEW_SHOT)
        if "scores_whole_batch" not in own:
            cls.scores_whole_batch = lt is LearningType.BATCH_ZERO_SHOT
        if "min_batch" not in own:
            cls.min_batch = 2 if lt is LearningType.BATCH_ZERO_SHOT else 1

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._fitted = False
        self.num_shots = 0
        self.category: str | None = None
        #: the options ``create_detector`` built this detector with (None when the class was
        #: called directly); model files record them to rebuild the detector
        self.init_options: dict[str, Any] | None = None

    # --------------------------------------------------------------------- facts
    @classmethod
    def needs_normal_images(cls) -> bool:
        """True when fit() cannot work without at least one normal image (few-shot only)."""
        return cls.learning_type is LearningType.FEW_SHOT

    @classmethod
    def can_score_alone(cls) -> bool:
        """True when the method scores images without any normal image (zero-shot capable)."""
        return cls.learning_type is not LearningType.FEW_SHOT

    # --------------------------------------------------------------------- public API
    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def fit(
        self, normal_images: Sequence[ImageLike] | None = None, *, category: str | None = None
    ) -> Detector:
        """Learn the normal appearance from k normal images (None or [] for zero-shot).

        Args:
            normal_images: the k normal images. Methods that do not use normal images
                (``uses_normal_images`` False: zero-shot methods) ignore them, with a warning.
            category: the object / category name (e.g. ``"bottle"``). Methods whose text
                prompts name the object (``uses_category``: WinCLIP) use it; the others
                record it only. None: the method's generic wording.

        Raises:
            ValueError: a few-shot-only detector was given no normal image, or the category
                is not a non-empty string.
        """
        images = list(normal_images) if normal_images is not None else []
        if category is not None and (not isinstance(category, str) or not category.strip()):
            raise ValueError(f"category must be a non-empty string or None, got {category!r}")
        if not images and self.needs_normal_images():
            raise ValueError(
                f"{self.name} is a few-shot method: fit() needs at least one normal image "
                "(e.g. --normal DIR on the command line)"
            )
        if images and not self.uses_normal_images:
            warnings.warn(
                f"{self.name} is zero-shot: the {len(images)} normal image(s) given to fit() "
                "are ignored",
                UserWarning,
                stacklevel=2,
            )
            images = []
        # _fit may clear the old state before failing: never predict from a half-built model
        self._fitted = False
        self.category = category.strip() if category is not None else None
        with torch.inference_mode():
            self._fit(images)
        self.num_shots = len(images)
        self._fitted = True
        return self

    def predict(
        self, images: Sequence[ImageLike], groups: Sequence[str] | None = None
    ) -> Prediction:
        """Score a batch of images.

        Args:
            images: the images (arrays, PIL images or paths).
            groups: optional group label per image (e.g. its defect-type folder). Only batch
                methods that split a batch into stratified subsets use it (MuSc with
                ``divide_num > 1``); every other method ignores it.

        Returns:
            Prediction with image_score (B,) and anomaly_map (B, S, S), float32 on the CPU.
        """
        images = list(images)
        if not images:
            raise ValueError("predict() got no image")
        if len(images) < self.min_batch:
            raise ValueError(
                f"{self.name} scores a batch of images against each other: predict() needs at "
                f"least {self.min_batch} images, got {len(images)}"
            )
        if groups is not None and len(groups) != len(images):
            raise ValueError(f"predict() got {len(images)} images but {len(groups)} group labels")
        if not self._fitted:
            if self.needs_normal_images():
                raise NotFittedError(
                    f"{self.name} needs fit(normal_images) before predict(); it is a few-shot method"
                )
            self.fit(None)
        with torch.inference_mode():
            pred = self._predict_grouped(images, None if groups is None else list(groups))
        return Prediction(
            image_score=pred.image_score.float().cpu(),
            anomaly_map=pred.anomaly_map.float().cpu(),
            extras=pred.extras,
        )

    def batch_slices(self, n: int, batch_size: int) -> list[slice]:
        """How ``n`` images are split into predict() calls of at most ``batch_size``.

        Methods that score a batch against itself (``scores_whole_batch``) get one call.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        step = max(n, 1) if self.scores_whole_batch else batch_size
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def predict_batches(
        self,
        images: Sequence[ImageLike],
        batch_size: int = 8,
        *,
        groups: Sequence[str] | None = None,
        progress: bool = False,
        desc: str = "predict",
    ) -> Prediction:
        """Score any number of images the way the method needs, with optional progress.

        Ordinary methods are called on batches of ``batch_size``; batch methods on all images
        at once (their results depend on the whole batch).

        Returns:
            Prediction for all images: image_score (N,), anomaly_map (N, S, S).
        """
        images = list(images)
        if not images:
            raise ValueError("predict_batches() got no image")
        if groups is not None and len(groups) != len(images):
            raise ValueError(f"got {len(images)} images but {len(groups)} group labels")
        scores, maps = [], []
        extras: dict[str, list[torch.Tensor]] = {}
        bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False)
        for sl in self.batch_slices(len(images), batch_size):
            pred = self.predict(images[sl], groups=None if groups is None else groups[sl])
            scores.append(pred.image_score)
            maps.append(pred.anomaly_map)
            for key, value in pred.extras.items():
                extras.setdefault(key, []).append(value)
            bar.update(sl.stop - sl.start)
        bar.close()
        return Prediction(
            image_score=torch.cat(scores),
            anomaly_map=torch.cat(maps),
            extras={k: torch.cat(v) for k, v in extras.items() if len(v) == len(scores)},
        )

    def config(self) -> dict[str, Any]:
        """Settings that determine the results (written next to every result file)."""
        return {
            "method": self.name,
            "learning_type": self.learning_type.value,
            "image_size": self.image_size,
            "num_shots": self.num_shots,
            "category": self.category,
        }

    # ----------------------------------------------------------------- for subclasses
    @abc.abstractmethod
    def _fit(self, normal_images: list[ImageLike]) -> None:
        """Build the method's normal model (memory bank, statistics, ...)."""

    @abc.abstractmethod
    def _predict(self, images: list[ImageLike]) -> Prediction:
        """Score images; called under ``torch.inference_mode``."""

    def _predict_grouped(self, images: list[ImageLike], groups: list[str] | None) -> Prediction:
        """Score images with optional group labels; by default the labels are ignored."""
        return self._predict(images)

    # ----------------------------------------------------------------- model files
    def save(
        self,
        path: str | os.PathLike[str],
        *,
        threshold: Any = None,
        embed_weights: bool = False,
    ) -> Path:
        """Write the fitted detector as a model folder (or ``NAME.anomalens`` zip).

        Args:
            path: output folder, or a ``.anomalens`` file name.
            threshold: decision threshold to store (``anomalens.thresholds.Threshold``).
            embed_weights: store the backbone weights too (a self-contained file).

        See :func:`anomalens.model_file.save_detector`; read it back with
        ``anomalens.load_detector(path)``.
        """
        from anomalens.model_file import save_detector

        return save_detector(self, path, threshold=threshold, embed_weights=embed_weights)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state as named tensors (model files); every method implements it."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement _state_tensors(): it cannot be saved"
        )

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Restore the state written by ``_state_tensors`` (``config``: the saved config())."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement _load_state_tensors(): it cannot be loaded"
        )

    @classmethod
    def _backbone_option(cls, module: torch.nn.Module) -> Any:
        """The ``backbone`` option that makes the constructor use a rebuilt backbone module."""
        return module
