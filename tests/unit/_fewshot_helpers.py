"""Test helpers for the CNN few-shot detectors (PatchCore, MVG): synthetic images, shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
MOBILENET_TF = SHARED / "weights" / "mobilenet_v2_imagenet_int8dequant.safetensors"
MAGNETIC_TILE = SHARED / "data" / "magnetic_tile"

#: Blob of the synthetic anomaly: centre (row, col) and radius, in pixels of a 224 x 224 image.
BLOB_CENTER = (150, 70)
BLOB_RADIUS = 18


def textured_image(seed: int, size: int = 224, blob: bool = False) -> np.ndarray:
    """A seeded (size, size, 3) uint8 texture (oblique grating + noise), optionally with a
    bright disc at ``BLOB_CENTER`` of radius ``BLOB_RADIUS``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    base = 110 + 40 * np.sin((xx + 0.5 * yy) * (2 * np.pi / 12))
    img = base + rng.normal(0, 6, (size, size))
    if blob:
        r2 = (yy - BLOB_CENTER[0]) ** 2 + (xx - BLOB_CENTER[1]) ** 2
        img[r2 <= BLOB_RADIUS**2] = 250
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def require_shared(*paths: Path) -> None:
    """Skip the calling test when a file or folder of ../shared is absent."""
    for p in paths:
        if not p.exists():
            pytest.skip(f"needs {p.resolve()} (the team's ../shared folder); not found")


def _pick(folder: Path, n: int, rng: np.random.Generator) -> list[Path]:
    files = sorted(folder.glob("*.jpg"))
    return [files[i] for i in sorted(rng.choice(len(files), n, replace=False))]


def magnetic_tile_test_set(
    n_good: int = 10, n_per_defect: int = 4, seed: int = 0
) -> tuple[list[Path], np.ndarray]:
    """Seeded test subset of ../shared/data/magnetic_tile: n_good good images, then
    n_per_defect of each defect type. Returns (paths, labels 0 good / 1 defective)."""
    rng = np.random.default_rng(seed)
    root = MAGNETIC_TILE / "test"
    good = _pick(root / "good", n_good, rng)
    bad = [p for t in ("blowhole", "break", "crack") for p in _pick(root / t, n_per_defect, rng)]
    return good + bad, np.array([0] * len(good) + [1] * len(bad))


def magnetic_tile_references(shots: int, seed: int) -> list[Path]:
    """``shots`` distinct seeded images of train/good (the few-shot references)."""
    return _pick(MAGNETIC_TILE / "train" / "good", shots, np.random.default_rng(1000 + seed))
