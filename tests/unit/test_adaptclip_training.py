"""AdaptCLIP training recipe: losses, one-optimiser training, checkpoints, resume (tiny CLIP)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.training.adaptclip import AdaptCLIPTrainConfig, train_adaptclip
from anomalens.training.losses import dice_loss, focal_loss, head_loss
from anomalens.types import Sample

torch.set_num_threads(1)


def test_focal_and_dice_losses() -> None:
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    perfect = torch.stack([1 - target, target], dim=1)
    wrong = torch.stack([target, 1 - target], dim=1)
    assert focal_loss(perfect, target) < 1e-6
    # p_t = 1e-5 (smoothing) * 1 + 1e-5 everywhere -> -(1 - 2e-5)^2 log(2e-5)
    expected = -((1 - 2e-5) ** 2) * np.log(2e-5)
    assert focal_loss(wrong, target).item() == pytest.approx(expected, rel=1e-4)
    assert dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-7)
    assert dice_loss(1 - target, target).item() == pytest.approx(1 - 1 / 17)
    losses = head_loss(torch.tensor([[5.0, -5.0]]), perfect, torch.tensor([0]), target)
    assert set(losses) == {"global", "local"} and losses["global"] < 1e-3


def _dataset(root: Path, size: int = 32) -> list[Sample]:
    """Two categories; anomalies are bright squares with exact masks."""
    rng = np.random.default_rng(0)
    samples = []
    for cat in ("a", "b"):
        for split, n in (("train", 2), ("test", 4)):
            for i in range(n):
                img = np.full((size, size, 3), 90 if cat == "a" else 160, np.uint8)
                img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
                label = int(split == "test" and i % 2 == 1)
                path = root / f"{cat}_{split}_{i}.png"
                mask_path = None
                if label:
                    img[4:14, 4:14] = 255
                    mask = np.zeros((size, size), np.uint8)
                    mask[4:14, 4:14] = 255
                    mask_path = root / f"{cat}_{split}_{i}_mask.png"
                    Image.fromarray(mask).save(mask_path)
                Image.fromarray(img).save(path)
                samples.append(
                    Sample(path, label, mask_path, cat, "bad" if label else "good", split)
                )
    return samples


def test_train_checkpoints_and_resume(tmp_path: Path) -> None:
    from anomalens.backbones.tiny import make_tiny_clip
    from anomalens.detectors._adaptclip_checkpoint import load_adapter_checkpoint

    samples = _dataset(tmp_path)
    backbone = make_tiny_clip(seed=0, image_size=32)
    out = tmp_path / "run"
    first = train_adaptclip(
        samples, backbone, out, AdaptCLIPTrainConfig(epochs=1, batch_size=4, seed=3)
    )
    assert first.epochs == 1 and first.resumed_from == 0
    assert (out / "epoch_001.safetensors").is_file() and first.checkpoint.is_file()
    rows = [json.loads(r) for r in (out / "loss_log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"loss", "va_local", "ta_global", "pq4_local"} <= set(rows[0])
    before, _ = load_adapter_checkpoint(out / "epoch_001.safetensors")
    # resume: continues at epoch 2, keeps the epoch-1 log, and every adapter learns
    second = train_adaptclip(
        samples, backbone, out, AdaptCLIPTrainConfig(epochs=2, batch_size=4, seed=3)
    )
    assert second.resumed_from == 1 and second.epochs == 2 and len(second.epoch_losses) == 2
    assert len((out / "loss_log.jsonl").read_text().splitlines()) == 4
    after, _ = load_adapter_checkpoint(out / "epoch_002.safetensors")
    for key in (
        "textual.ctx_abnormal",
        "visual.local_adapter.fc1.weight",
        "visual.global_adapter.fc2.weight",
        "prompt_query.local_head.conv1.weight",
        "prompt_query.global_head.classifier.weight",
    ):
        assert not torch.equal(before[key], after[key]), key
    # the TA placeholder and the frozen buffers are not trained
    assert torch.equal(before["textual.token_ids"], after["textual.token_ids"])
    assert torch.equal(before["textual.token_prefix"], after["textual.token_prefix"])


def test_training_needs_test_queries(tmp_path: Path) -> None:
    samples = [s for s in _dataset(tmp_path) if s.split == "train"]
    with pytest.raises(ValueError, match="test"):
        train_adaptclip(
            samples, "anomalens-tiny-clip@64", tmp_path / "x", AdaptCLIPTrainConfig(epochs=1)
        )


def test_mid_epoch_resume_equals_an_uninterrupted_run_and_settings_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalens.backbones.tiny import make_tiny_clip
    from anomalens.training import adaptclip as recipe_module

    samples = _dataset(tmp_path)
    backbone = make_tiny_clip(seed=0, image_size=32)
    config = AdaptCLIPTrainConfig(epochs=2, batch_size=4, seed=3, checkpoint_every_steps=1)
    straight = train_adaptclip(samples, backbone, tmp_path / "straight", config)
    real, calls = recipe_module._AdaptCLIPRecipe.losses, []

    def crash_in_step_4(self, batch):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated interruption")
        return real(self, batch)

    monkeypatch.setattr(recipe_module._AdaptCLIPRecipe, "losses", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_adaptclip(samples, backbone, tmp_path / "crash", config)
    monkeypatch.undo()
    state = json.loads((tmp_path / "crash" / "train_state.json").read_text())
    assert (state["epoch"], state["batch"], state["step"]) == (1, 1, 3)  # mid epoch 2
    with pytest.raises(ValueError, match=r"settings differ \(lr: run 0\.001, now 0\.01\)"):
        train_adaptclip(samples, backbone, tmp_path / "crash", AdaptCLIPTrainConfig(
            epochs=2, batch_size=4, seed=3, lr=0.01
        ))  # fmt: skip
    resumed = train_adaptclip(samples, backbone, tmp_path / "crash", config)
    assert resumed.resumed_from == 1 and resumed.steps == straight.steps == 4
    from safetensors.torch import load_file

    a, b = load_file(str(straight.checkpoint)), load_file(str(resumed.checkpoint))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
