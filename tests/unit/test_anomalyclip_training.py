"""AnomalyCLIP training: learned prompts transfer to unseen categories; resume; checkpoints.

The tiny random CLIP cannot see the small defects of ``anomalens.data.synthetic`` (measured:
no reliable gain, see docs/methods/anomalyclip.md), so the transfer test uses conspicuous
defects (16 px bright or dark squares on 64 px images) on three texture "categories": prompts
are trained on two and evaluated zero-shot on the third (pixel AP rises clearly; the image AUROC
of the random global token does not, reliably).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.data.io import load_mask
from anomalens.metrics import image_metrics, pixel_metrics
from anomalens.training.anomalyclip import FINAL_NAME, train_anomalyclip
from anomalens.types import Sample

SIZE = 64


def _texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) float image of one texture category with random variation."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    base = rng.uniform(70, 150)
    if kind == "noise":
        img = base + rng.normal(0, 15, (SIZE, SIZE, 1))
    elif kind == "stripes":
        period, phase = rng.uniform(6, 12), rng.uniform(0, 2 * np.pi)
        img = (base + 30 * np.sin(2 * np.pi * x / period + phase))[..., None]
    elif kind == "checker":
        cell = int(rng.integers(6, 11))
        img = (base + 25 * (((y // cell) + (x // cell)) % 2 * 2 - 1))[..., None]
    else:
        raise ValueError(kind)
    tint = rng.uniform(0.85, 1.15, 3)
    return img * tint + rng.normal(0, 4, (SIZE, SIZE, 3))


def make_square_defect_samples(folder: Path, category: str, n: int, seed: int) -> list[Sample]:
    """n images of ``category`` (every second one with a 16 px bright/dark square), on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = _texture(category, rng)
        label = i % 2
        mask_path = None
        if label:
            mask = np.zeros((SIZE, SIZE), dtype=bool)
            top, left = rng.integers(4, SIZE - 20, 2)
            mask[top : top + 16, left : left + 16] = True
            img[mask] = 245 if rng.random() < 0.5 else 10
            mask_path = folder / f"{category}_{i:03d}_mask.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        path = folder / f"{category}_{i:03d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        out.append(Sample(path, label, mask_path, category, "square" if label else "good"))
    return out


def _evaluate(det: Any, samples: list[Sample]) -> tuple[float, float]:
    pred = det.predict([s.image_path for s in samples])
    labels = np.array([s.label for s in samples])
    masks = np.stack(
        [load_mask(s.mask_path) if s.mask_path else np.zeros((SIZE, SIZE), bool) for s in samples]
    )
    return (
        image_metrics(pred.image_score.numpy(), labels)["image_auroc"],
        pixel_metrics(pred.anomaly_map.numpy(), masks)["pixel_ap"],
    )


def run_transfer(tmp: Path, seed: int, epochs: int = 15) -> dict[str, tuple[float, float]]:
    """Train on noise + stripes, test zero-shot on checker; (image AUROC, pixel AP) per model."""
    from anomalens.backbones.tiny import make_tiny_clip
    from anomalens.detectors.anomalyclip import AnomalyCLIP

    train = make_square_defect_samples(tmp / "data", "noise", 24, seed) + (
        make_square_defect_samples(tmp / "data", "stripes", 24, seed + 1)
    )
    test = make_square_defect_samples(tmp / "data", "checker", 24, seed + 2)
    backbone = make_tiny_clip(seed=seed, image_size=SIZE)
    with pytest.warns(UserWarning, match="untrained"):
        untrained = AnomalyCLIP(backbone, seed=seed)
    before = _evaluate(untrained, test)
    ckpt = train_anomalyclip(
        train, backbone, tmp / "run", epochs=epochs, lr=0.01, batch_size=8, seed=seed,
        cache_features=True, progress=False, resume=False,
    )  # fmt: skip
    after = _evaluate(AnomalyCLIP(backbone, checkpoint=ckpt), test)
    return {"untrained": before, "trained": after}


def test_trained_prompts_beat_untrained_on_an_unseen_category(tmp_path: Path) -> None:
    # measured over seeds 0..5 (docs/methods/anomalyclip.md): pixel AP gains +0.10..+0.24
    # (trained >= 4.8x untrained); the image AUROC of the random tiny CLIP's global token does
    # not move reliably (gains -0.37..+0.43), so it is not asserted.
    res = run_transfer(tmp_path, seed=0)
    (_, ap0), (_, ap1) = res["untrained"], res["trained"]
    assert ap1 >= ap0 + 0.07, res
    assert ap1 >= 3 * ap0, res


def _square_set(tmp: Path) -> list[Sample]:
    return make_square_defect_samples(tmp / "data", "noise", 12, 7)


def _train(tmp: Path, samples: list[Sample], out: str, epochs: int, **kw: Any) -> Path:
    from anomalens.backbones.tiny import make_tiny_clip

    return train_anomalyclip(
        samples, make_tiny_clip(seed=1, image_size=SIZE), tmp / out, epochs=epochs, lr=0.01,
        batch_size=5, seed=3, progress=False, **kw,
    )  # fmt: skip


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    samples = _square_set(tmp_path)
    straight = _train(tmp_path, samples, "straight", epochs=3)
    # an "interrupted" run: 1 epoch, then resumed to 3 (the resume point of epoch 1 is used)
    _train(tmp_path, samples, "resumed", epochs=1, checkpoint_every_steps=2)
    state = json.loads((tmp_path / "resumed" / "train_state.json").read_text())
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 3)  # 12 images / 5 = 3 steps
    resumed = _train(tmp_path, samples, "resumed", epochs=3)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "resumed" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 10))
    assert {"loss", "image_loss", "pixel_loss", "epoch"} <= json.loads(lines[0]).keys()
    assert (tmp_path / "resumed" / "epoch_003.safetensors").is_file()
    assert resumed.name == FINAL_NAME
    optim = torch.load(tmp_path / "resumed" / "optimizer.pt", weights_only=True)
    assert optim["state"]  # Adam moments saved
    # training changes the prompts; the loss goes down on the training set
    first = [json.loads(x)["loss"] for x in lines[:3]]
    last = [json.loads(x)["loss"] for x in lines[-3:]]
    assert np.mean(last) < np.mean(first)


def test_mid_epoch_crash_resume_and_settings_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    import anomalens.training.anomalyclip as training

    samples = _square_set(tmp_path)
    straight = _train(tmp_path, samples, "straight", epochs=2)
    real_loss, calls = training.anomalyclip_loss, []

    def crash_at_step_5(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "anomalyclip_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, samples, "crash", epochs=2, checkpoint_every_steps=2)
    monkeypatch.setattr(training, "anomalyclip_loss", real_loss)
    state = json.loads((tmp_path / "crash" / "train_state.json").read_text())
    assert (state["epoch"], state["batch"], state["step"]) == (1, 1, 4)  # mid epoch 2
    assert not (tmp_path / "crash" / FINAL_NAME).exists()
    resumed = _train(tmp_path, samples, "crash", epochs=2)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "crash" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 7))
    with pytest.raises(ValueError, match="settings differ"):
        _train(tmp_path, samples, "crash", epochs=3, layers=(2, 4))


def test_training_input_errors(tmp_path: Path) -> None:
    samples = _square_set(tmp_path)
    with pytest.raises(ValueError, match="no training sample"):
        train_anomalyclip([], out=tmp_path / "x")
    normals = [s for s in samples if s.label == 0]
    with pytest.raises(ValueError, match="masks"):
        _train(tmp_path, normals, "n", epochs=1)
    unlabelled = [Sample(samples[0].image_path, -1)]
    with pytest.raises(ValueError, match="labelled"):
        _train(tmp_path, unlabelled + samples, "u", epochs=1)
