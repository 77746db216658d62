"""AdaptCLIP training learns something that transfers to categories never seen in training.

Data: the project's synthetic generator (``generate_synthetic_dataset``) at 64 px (tiny random
CLIP, 8 px patches -> 8x8 grid) with ``defect_types=("hole",)`` and ``defect_scale=4`` (at
scale 1 the defects are smaller than one patch at 64 px; at 4 a hole covers about 170 px, a
dark disc with a bright rim). Adapters are trained on ``woven``, ``grain`` and ``washer`` (4
normal prompt images + 12 normal and 12 defective queries each; 15 epochs, lr 3e-3, batch 8)
and tested, zero-shot and 1-shot, on the unseen ``tile`` and ``screw`` (10 + 10 each) against
untrained adapters (random init seeds 0-2).

Measured with ``run_learning_experiment`` (mean +- std; trained = training seeds 0-2,
untrained = init seeds 0-2):

    data seed        3 untrained      3 trained        5 untrained      5 trained
    0-shot I-AUROC   0.420 +- 0.218   0.707 +- 0.022   0.532 +- 0.158   0.670 +- 0.011
    0-shot P-AP      0.104 +- 0.071   0.144 +- 0.032   0.125 +- 0.084   0.139 +- 0.045
    1-shot I-AUROC   0.810 +- 0.064   0.843 +- 0.024   0.902 +- 0.038   0.832 +- 0.019
    1-shot P-AP      0.494 +- 0.033   0.656 +- 0.009   0.532 +- 0.034   0.629 +- 0.014

Smallest gain of a trained seed over the untrained mean: +0.12 zero-shot image AUROC and +0.077
one-shot pixel AP; the test asserts +0.06 and +0.04 (data seed 3, training seed 0). Zero-shot
pixel AP and 1-shot image AUROC do not rise reliably and are not asserted. With stains and
holes mixed (lr 1e-2) zero-shot image AUROC rose as well (+0.13 or more) but 1-shot pixel AP
only by +0.003..+0.08 and zero-shot pixel AP fell (see ``docs/methods/adaptclip.md``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalens.data.mvtec import make_mvtec_index
from anomalens.data.synthetic import generate_synthetic_dataset
from anomalens.types import Sample

torch.set_num_threads(1)

IMAGE_SIZE = 64
TRAIN_CATEGORIES = ("woven", "grain", "washer")
TEST_CATEGORIES = ("tile", "screw")
DEFECT_TYPES = ("hole",)
DEFECT_SCALE = 4.0


def make_synthetic_samples(
    root: Path, categories: tuple[str, ...], n_train: int, n_test: int, seed: int
) -> list[Sample]:
    """Train and test samples of the synthetic generator (``n_test`` normal and ``n_test``
    defective test images per category), written under ``root``."""
    generate_synthetic_dataset(
        root, categories, n_train=n_train, n_test_good=n_test, n_test_defect=n_test,
        image_size=IMAGE_SIZE, seed=seed, write_meta=False, defect_scale=DEFECT_SCALE,
        defect_types=DEFECT_TYPES,
    )  # fmt: skip
    return [
        s for c in categories for sp in ("train", "test") for s in make_mvtec_index(root, c, sp)
    ]


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
    train = make_synthetic_samples(
        root / "train", TRAIN_CATEGORIES, n_train=4, n_test=n_train_queries, seed=data_seed
    )
    test = make_synthetic_samples(
        root / "test", TEST_CATEGORIES, n_train=2, n_test=n_test, seed=data_seed + 1
    )
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
    [("zero", 0, 0.06), ("one", 1, 0.04)],
    ids=["zero-shot-image-auroc", "one-shot-pixel-ap"],
)
def test_training_beats_untrained_adapters_on_unseen_categories(
    learning: dict[str, dict[str, tuple[float, float]]], mode: str, metric: int, margin: float
) -> None:
    trained = learning["trained"][mode][metric]
    untrained = [v[mode][metric] for k, v in learning.items() if k.startswith("untrained")]
    assert trained >= np.mean(untrained) + margin, (trained, untrained)
