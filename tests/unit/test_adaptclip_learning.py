"""AdaptCLIP training learns something that transfers to categories never seen in training.

Setup (tiny random CLIP, 64 px, 8 px patches -> 8x8 grid): normal images are rendered by the
synthetic generator (``render_synthetic_sample``); anomalies are saturated colour stains
(blue, magenta or green tint, elliptical, 6-12 px radius, i.e. one to three patches across)
painted here with an exact mask, because the generator's own defects are a few pixels wide at
64 px, far below one patch. Adapters are trained on ``woven``, ``grain`` and ``washer`` and
tested, zero-shot and 1-shot, on the unseen ``tile`` and ``screw``, against untrained adapters
(random init, several seeds). A colour stain is a cue that exists in every category, so even
random CLIP features can carry it across categories. A mix of dark, bright and tinted blobs
(10 epochs, lr 1e-3) gave no zero-shot pixel gain (see ``docs/methods/adaptclip.md``).

Measured with ``run_learning_experiment`` (data seed 3, 12+12 training queries per category,
15 epochs, lr 3e-3; mean +- std over training seeds 0-2 for trained, init seeds 0-2 untrained):

    metric           untrained        trained
    0-shot I-AUROC   0.588 +- 0.111   0.613 +- 0.033
    0-shot P-AP      0.101 +- 0.089   0.342 +- 0.030
    1-shot I-AUROC   0.827 +- 0.041   0.888 +- 0.060
    1-shot P-AP      0.401 +- 0.011   0.579 +- 0.040

Over these and 3 more (data seed, training seed) runs the pixel-AP gains were always >= +0.21
(0-shot) and >= +0.12 (1-shot); the asserted margins are about half of that. Image AUROC did
not improve reliably (one 1-shot run lost 0.02, 0-shot is within the untrained spread), so it
is not asserted.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalens.data.synthetic import render_synthetic_sample
from anomalens.types import Sample

torch.set_num_threads(1)

IMAGE_SIZE = 64
TRAIN_CATEGORIES = ("woven", "grain", "washer")
TEST_CATEGORIES = ("tile", "screw")
#: (R, G, B) gains of the stains: off the palette of every synthetic category.
STAIN_TINTS = ((0.5, 0.75, 1.3), (1.2, 0.6, 1.2), (0.6, 1.25, 0.6))


def paint_stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one saturated colour stain (a tinted ellipse) on an image.

    Args:
        image: (S, S, 3) uint8.
        rng: random generator (position, radii, angle, tint).

    Returns:
        the stained image (S, S, 3) uint8 and its mask (S, S) bool (exactly the changed pixels).
    """
    s = image.shape[0]
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    cy, cx = rng.uniform(0.2 * s, 0.8 * s, 2)
    ry, rx = rng.uniform(0.09, 0.18, 2) * s
    angle = rng.uniform(0, np.pi)
    u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / rx
    v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / ry
    inside = (u**2 + v**2) < 1
    tint = np.asarray(STAIN_TINTS[int(rng.integers(len(STAIN_TINTS)))], np.float32)
    stained = np.clip(np.rint(image.astype(np.float32) * tint), 0, 255).astype(np.uint8)
    out = np.where(inside[..., None], stained, image)
    mask = (out != image).any(axis=2)
    return out, mask


def make_stain_dataset(
    root: Path, categories: tuple[str, ...], n_train: int, n_test: int, seed: int
) -> list[Sample]:
    """MVTec-like sample list: ``n_train`` normal train images, ``n_test`` normal and ``n_test``
    stained test images per category (PNG files under ``root``)."""
    samples = []
    for ci, cat in enumerate(categories):
        for split, label, n in (("train", 0, n_train), ("test", 0, n_test), ("test", 1, n_test)):
            for i in range(n):
                key = [seed, ci, int(split == "train"), label, i]
                image = render_synthetic_sample(cat, key, None, IMAGE_SIZE).image
                path = root / f"{cat}_{split}_{label}_{i}.png"
                mask_path = None
                if label:
                    image, mask = paint_stain(image, np.random.default_rng([*key, 99]))
                    mask_path = root / f"{cat}_{split}_{label}_{i}_mask.png"
                    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
                Image.fromarray(image).save(path)
                defect = "stain" if label else "good"
                samples.append(Sample(path, label, mask_path, cat, defect, split))
    return samples


def evaluate(det, samples: list[Sample], shots: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Mean over categories of image AUROC and pixel AP (``shots`` train images as prompts)."""
    aurocs, aps = [], []
    for cat in sorted({s.category for s in samples}):
        train = [str(s.image_path) for s in samples if s.category == cat and s.split == "train"]
        test = [s for s in samples if s.category == cat and s.split == "test"]
        det.fit(train[:shots] if shots else None)
        pred = det.predict([str(s.image_path) for s in test])
        masks = np.stack(
            [
                np.asarray(Image.open(s.mask_path)) > 127
                if s.mask_path
                else np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
                for s in test
            ]
        )
        aurocs.append(roc_auc_score([s.label for s in test], pred.image_score.numpy()))
        aps.append(average_precision_score(masks.ravel(), pred.anomaly_map.numpy().ravel()))
    return float(np.mean(aurocs)), float(np.mean(aps))


def run_learning_experiment(
    root: Path,
    train_seed: int = 0,
    init_seeds: tuple[int, ...] = (0, 1, 2),
    epochs: int = 15,
    lr: float = 3e-3,
    data_seed: int = 3,
    n_train_queries: int = 12,
    n_test: int = 10,
) -> dict[str, dict[str, tuple[float, float]]]:
    """Train once and evaluate trained and untrained adapters on the unseen categories.

    Returns:
        ``{"trained": {...}, "untrained_<seed>": {...}}``, each ``{"zero": (I-AUROC, P-AP),
        "one": (I-AUROC, P-AP)}``.
    """
    from anomalens.backbones.tiny import make_tiny_clip
    from anomalens.detectors.adaptclip import AdaptCLIP
    from anomalens.training.adaptclip import train_adaptclip

    root.mkdir(parents=True, exist_ok=True)
    train = make_stain_dataset(
        root, TRAIN_CATEGORIES, n_train=4, n_test=n_train_queries, seed=data_seed
    )
    test = make_stain_dataset(root, TEST_CATEGORIES, n_train=2, n_test=n_test, seed=data_seed + 1)
    backbone = make_tiny_clip(seed=0, image_size=IMAGE_SIZE)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="AdaptCLIP adapters are untrained")
        for seed in init_seeds:
            det = AdaptCLIP(backbone, seed=seed, batch_size=32)
            out[f"untrained_{seed}"] = {
                "zero": evaluate(det, test, 0),
                "one": evaluate(det, test, 1),
            }
    result = train_adaptclip(
        train,
        backbone,
        root / "run",
        epochs=epochs,
        batch_size=8,
        lr=lr,
        seed=train_seed,
        checkpoint_every=epochs,
        resume=False,
    )
    det = AdaptCLIP(backbone, checkpoint=result.checkpoint, batch_size=32)
    out["trained"] = {"zero": evaluate(det, test, 0), "one": evaluate(det, test, 1)}
    return out


@pytest.fixture(scope="module")
def learning(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, tuple[float, float]]]:
    return run_learning_experiment(tmp_path_factory.mktemp("adaptclip_learning"))


@pytest.mark.parametrize(
    ("mode", "metric", "margin"),
    [("zero", 1, 0.1), ("one", 1, 0.06)],
    ids=["zero-shot-pixel-ap", "one-shot-pixel-ap"],
)
def test_training_beats_untrained_adapters_on_unseen_categories(
    learning: dict[str, dict[str, tuple[float, float]]], mode: str, metric: int, margin: float
) -> None:
    trained = learning["trained"][mode][metric]
    untrained = [v[mode][metric] for k, v in learning.items() if k.startswith("untrained")]
    assert trained >= np.mean(untrained) + margin, (trained, untrained)
