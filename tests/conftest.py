"""Shared test fixtures: paths to ../shared, a tiny toy detector, single-threaded torch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalens.data.io import ImageLike
from anomalens.data.transforms import to_batch
from anomalens.detectors.base import Detector
from anomalens.registry import register_detector
from anomalens.types import LearningType, Prediction

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()

torch.set_num_threads(int(os.environ.get("ANOMALENS_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """tests/integration/ is ``slow`` (``make test-fast`` leaves it out); ``gpu`` tests skip
    without CUDA."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test with a clear reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(
            f"needs {p} (the team's shared/ folder beside the checkout; absent in a user clone)"
        )
    return p


@register_detector("toy")
class ToyDetector(Detector):
    """Test-only few-shot detector: |grey image - mean grey of the shots| at 32 x 32."""

    learning_type = LearningType.FEW_SHOT
    image_size = 32

    def __init__(self, device: str = "cpu", offset: float = 0.0) -> None:
        super().__init__(device)
        self.offset = offset
        self.reference: torch.Tensor | None = None

    def _grey(self, images: list[ImageLike]) -> torch.Tensor:
        return to_batch(images, self.image_size, mean=(0, 0, 0), std=(1, 1, 1)).mean(1)

    def _fit(self, normal_images: list[ImageLike]) -> None:
        self.reference = self._grey(normal_images).mean(0)

    def _predict(self, images: list[ImageLike]) -> Prediction:
        maps = (self._grey(images) - self.reference).abs() + self.offset
        return Prediction(maps.flatten(1).max(1).values, maps)

    def config(self) -> dict:
        return {**super().config(), "offset": self.offset}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small seeded synthetic dataset in MVTec layout, shared by the whole session."""
    from anomalens.data.synthetic import generate_synthetic_dataset, list_synthetic_categories

    root = tmp_path_factory.mktemp("synth")
    cats = list_synthetic_categories()[:2]
    return generate_synthetic_dataset(
        root, categories=cats, n_train=6, n_test_good=4, n_test_defect=4, image_size=96, seed=0
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@register_detector("toy-batch")
class ToyBatchDetector(ToyDetector):
    """Test-only batch zero-shot detector: deviation from the mean of the scored batch."""

    learning_type = LearningType.BATCH_ZERO_SHOT

    def _fit(self, normal_images: list[ImageLike]) -> None:
        self.reference = None

    def _predict(self, images: list[ImageLike]) -> Prediction:
        if len(images) < 2:
            raise ValueError("toy-batch needs a batch of images")
        grey = self._grey(images)
        maps = (grey - grey.mean(0, keepdim=True)).abs()
        return Prediction(maps.flatten(1).max(1).values, maps)


@register_detector("toy-zero")
class ToyZeroShotDetector(ToyDetector):
    """Test-only zero-shot detector with probability-like scores (brightness)."""

    learning_type = LearningType.ZERO_SHOT
    default_threshold = 0.5

    def _fit(self, normal_images: list[ImageLike]) -> None:
        self.reference = None

    def _predict(self, images: list[ImageLike]) -> Prediction:
        maps = self._grey(images)
        return Prediction(maps.flatten(1).max(1).values, maps)


@register_detector("toy-zero-or-few")
class ToyZeroOrFewShotDetector(ToyZeroShotDetector):
    """Test-only zero-or-few-shot detector (its zero-shot path scores brightness)."""

    learning_type = LearningType.ZERO_OR_FEW_SHOT
