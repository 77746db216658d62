"""Core records shared by every detector, reader and front end."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["LearningType", "Prediction", "Sample"]


class LearningType(str, enum.Enum):
    """How a detector learns about the normal appearance of a category.

    ZERO_SHOT: needs no normal image of the category (``fit(None)`` or no ``fit`` at all).
    FEW_SHOT: needs k >= 1 normal images of the category at ``fit`` time.
    ZERO_OR_FEW_SHOT: works with ``fit(None)`` and improves with k normal images.
    BATCH_ZERO_SHOT: needs no normal image but scores a *batch* of unlabeled test images
        against each other (MuSc); ``predict`` must receive several images.
    """

    ZERO_SHOT = "zero_shot"
    FEW_SHOT = "few_shot"
    ZERO_OR_FEW_SHOT = "zero_or_few_shot"
    BATCH_ZERO_SHOT = "batch_zero_shot"


@dataclass
class Prediction:
    """Output of ``Detector.predict`` for a batch of B images.

    Attributes:
        image_score: (B,) float32, higher = more anomalous.
        anomaly_map: (B, S, S) float32 at the detector's working size S, higher = more anomalous.
        extras: optional named intermediate tensors (per-head maps, ...), for inspection only.
    """

    image_score: torch.Tensor
    anomaly_map: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_score.ndim != 1:
            raise ValueError(f"image_score must be (B,), got {tuple(self.image_score.shape)}")
        if self.anomaly_map.ndim != 3 or self.anomaly_map.shape[0] != self.image_score.shape[0]:
            raise ValueError(
                "anomaly_map must be (B, H, W) with the same B as image_score, got "
                f"{tuple(self.anomaly_map.shape)} and {tuple(self.image_score.shape)}"
            )

    def __len__(self) -> int:
        return int(self.image_score.shape[0])

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores (B,), maps (B, S, S)) as float32 numpy arrays on the CPU."""
        return (
            self.image_score.detach().float().cpu().numpy(),
            self.anomaly_map.detach().float().cpu().numpy(),
        )


@dataclass(frozen=True)
class Sample:
    """One image of a dataset index.

    Attributes:
        image_path: path to the image file.
        label: 0 = normal, 1 = anomalous, -1 = unknown (unlabelled query images).
        mask_path: ground-truth mask (None for normal images or when no mask exists;
            a normal image's mask is all zeros).
        category: category / product name.
        defect_type: folder name of the defect (``good``/``ok`` for normal images, "" if unknown).
        split: ``train`` or ``test``.
        reference_path: the image's own normal reference (reference-based inspection:
            golden sample, template), or None.
    """

    image_path: Path
    label: int
    mask_path: Path | None = None
    category: str = ""
    defect_type: str = ""
    split: str = "test"
    reference_path: Path | None = None
