"""The one detector interface every method implements."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from anomalens.data.io import ImageLike
from anomalens.types import LearningType, Prediction

__all__ = ["Detector", "NotFittedError"]


class NotFittedError(RuntimeError):
    """Raised when ``predict`` is called before a required ``fit``."""


class Detector(abc.ABC):
    """Base class of all anomaly detectors.

    Subclasses set ``learning_type`` and ``image_size`` (working size S: maps are (S, S)),
    implement ``_fit`` and ``_predict``, and are registered with
    ``anomalens.registry.register_detector``.

    Usage::

        det = create_detector("patchcore", weights="mobilenet_v2.safetensors")
        det.fit(normal_images)          # k normal images, or None for zero-shot methods
        pred = det.predict(images)      # Prediction(image_score (B,), anomaly_map (B, S, S))
    """

    name: ClassVar[str] = "detector"
    learning_type: ClassVar[LearningType] = LearningType.FEW_SHOT
    image_size: int = 224
    #: Threshold used when the user gives neither normal images nor a threshold: set by methods
    #: whose scores are anomaly probabilities in [0, 1] (0.5); None = no sensible default.
    default_threshold: ClassVar[float | None] = None

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._fitted = False
        self.num_shots = 0

    # --------------------------------------------------------------------- public API
    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def fit(self, normal_images: Sequence[ImageLike] | None = None) -> Detector:
        """Learn the normal appearance from k normal images (None or [] for zero-shot).

        Raises:
            ValueError: a few-shot-only detector was given no normal image.
        """
        images = list(normal_images) if normal_images is not None else []
        if not images and self.learning_type is LearningType.FEW_SHOT:
            raise ValueError(
                f"{self.name} is a few-shot method: fit() needs at least one normal image "
                "(e.g. --normal DIR on the command line)"
            )
        # _fit may clear the old state before failing: never predict from a half-built model
        self._fitted = False
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
        if groups is not None and len(groups) != len(images):
            raise ValueError(f"predict() got {len(images)} images but {len(groups)} group labels")
        if not self._fitted:
            if self.learning_type is LearningType.FEW_SHOT:
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

    def config(self) -> dict[str, Any]:
        """Settings that determine the results (written next to every result file)."""
        return {
            "method": self.name,
            "learning_type": self.learning_type.value,
            "image_size": self.image_size,
            "num_shots": self.num_shots,
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
