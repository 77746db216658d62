"""The training loop shared by AdaptCLIP and AnomalyCLIP: resume, settings check, local RNG."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from anomalens.detectors._checkpoint import read_checkpoint_file, save_checkpoint
from anomalens.training._loop import TrainConfig, run_training

torch.set_num_threads(1)


class ToyRecipe:
    """Least squares on 10 fixed points, batches of 3 drawn from (seed, epoch)."""

    log_name = "log.jsonl"
    final_name = "final.safetensors"

    def __init__(self, seed: int = 0, crash_at_call: int | None = None) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(10, 2, generator=g)
        self.y = self.x @ torch.tensor([[2.0], [-1.0]])
        self.seed, self.crash_at_call, self.calls = seed, crash_at_call, 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Linear(2, 1)

    @property
    def module(self) -> nn.Module:
        return self.net

    def plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(10, generator=g).tolist()
        return [order[i : i + 3] for i in range(0, 10, 3)]

    def losses(self, batch: list[int]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.crash_at_call:
            raise KeyboardInterrupt("simulated interruption")
        err = self.net(self.x[batch]) - self.y[batch]
        return {"loss": err.pow(2).mean(), "abs": err.abs().mean()}

    def save(self, path: Path, extra: Mapping[str, Any]) -> None:
        save_checkpoint(path, self.net.state_dict(), kind="toy", config={}, extra=extra)

    def load(self, path: Path) -> None:
        state, _ = read_checkpoint_file(path, "toy", "toy checkpoint", dict)
        self.net.load_state_dict(state)


def _config(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 3, "lr": 0.05, **kw})


SETTINGS = {"lr": 0.05, "layers": (1, 2)}


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = run_training(ToyRecipe(), tmp_path / "a", _config(), SETTINGS)
    assert (straight.epochs, straight.steps, straight.resumed_from) == (3, 12, 0)
    assert len(straight.epoch_losses) == 3
    assert straight.epoch_losses[-1] < straight.epoch_losses[0]
    with pytest.raises(KeyboardInterrupt):  # crash in the 7th step (epoch 2, batch 3)
        run_training(
            ToyRecipe(crash_at_call=7), tmp_path / "b", _config(checkpoint_every_steps=2), SETTINGS
        )
    state = json.loads((tmp_path / "b" / "train_state.json").read_text())
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 6)
    assert not (tmp_path / "b" / "final.safetensors").exists()
    with (tmp_path / "b" / "log.jsonl").open("a") as f:
        f.write('{"epoch": 2, "step": 7, "lo')  # a line cut short by the interruption
    resumed = run_training(ToyRecipe(), tmp_path / "b", _config(), SETTINGS)
    assert resumed.resumed_from == 1 and resumed.steps == 12
    a = read_checkpoint_file(straight.checkpoint, "toy", "toy", dict)[0]
    b = read_checkpoint_file(resumed.checkpoint, "toy", "toy", dict)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"epoch", "step", "time", "loss", "abs"} <= rows[0].keys()
    assert resumed.epoch_losses == pytest.approx(straight.epoch_losses)
    # every file is complete: no temporary file left behind
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]
    optim = torch.load(tmp_path / "b" / "optimizer.pt", weights_only=True)
    assert optim["state"]


def test_resume_with_other_settings_is_refused_by_name(tmp_path: Path) -> None:
    run_training(ToyRecipe(), tmp_path, _config(epochs=1), SETTINGS)
    other = {"lr": 0.01, "layers": (1, 2), "new": True}
    with pytest.raises(ValueError, match="settings differ") as err:
        run_training(ToyRecipe(), tmp_path, _config(epochs=2), other)
    assert "lr: run 0.05, now 0.01" in str(err.value) and "new: run None, now True" in str(
        err.value
    )
    assert "layers" not in str(err.value)  # tuple and JSON list compare equal
    # resume=False starts over
    fresh = run_training(ToyRecipe(), tmp_path, _config(epochs=1, resume=False), other)
    assert fresh.resumed_from == 0 and fresh.steps == 4


def test_more_epochs_continue_fewer_are_refused(tmp_path: Path) -> None:
    run_training(ToyRecipe(), tmp_path, _config(epochs=2), SETTINGS)
    with pytest.raises(ValueError, match="completed 2 epochs, more than the 1"):
        run_training(ToyRecipe(), tmp_path, _config(epochs=1), SETTINGS)
    more = run_training(ToyRecipe(), tmp_path, _config(epochs=3), SETTINGS)
    assert (more.resumed_from, more.epochs, more.steps) == (2, 3, 12)


def test_stale_or_inconsistent_resume_points_are_refused(tmp_path: Path) -> None:
    run_training(ToyRecipe(), tmp_path, _config(epochs=1), SETTINGS)
    state_path = tmp_path / "train_state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "step": 3}))  # weights say step 4
    with pytest.raises(ValueError, match=r"at step 4 but train_state\.json at step 3"):
        run_training(ToyRecipe(), tmp_path, _config(), SETTINGS)
    # a state written before the settings were recorded (AdaptCLIP's first version)
    state_path.write_text(json.dumps({"epoch": 1, "epochs": 1, "seed": 3}))
    with pytest.raises(ValueError, match="not a resume state"):
        run_training(ToyRecipe(), tmp_path, _config(), SETTINGS)
    state_path.write_text(json.dumps({"epoch": 1, "batch": 0, "step": 4}))
    with pytest.raises(ValueError, match="records no settings"):
        run_training(ToyRecipe(), tmp_path, _config(), SETTINGS)


def test_bad_settings_and_progress_callback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="checkpoint_every_steps=0"):
        TrainConfig(checkpoint_every_steps=0)
    empty = ToyRecipe()
    empty.plan = lambda epoch: []  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="no batch"):
        run_training(empty, tmp_path / "empty", _config(), SETTINGS)
    rows: list[dict[str, float]] = []
    run_training(ToyRecipe(), tmp_path, _config(epochs=1), SETTINGS, progress=rows.append)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_recipes_leave_the_global_generators_alone(tmp_path: Path) -> None:
    from test_adaptclip_training import _dataset  # the data sets of the recipes' own tests
    from test_anomalyclip_training import make_square_defect_samples

    from anomalens.backbones.tiny import make_tiny_clip
    from anomalens.training.adaptclip import AdaptCLIPTrainConfig, train_adaptclip
    from anomalens.training.anomalyclip import AnomalyCLIPTrainConfig, train_anomalyclip

    samples = _dataset(tmp_path)
    squares = make_square_defect_samples(tmp_path / "sq", "noise", 6, 7)
    torch.manual_seed(5)
    random.seed(5)
    before = torch.random.get_rng_state(), random.getstate()
    train_adaptclip(
        samples,
        make_tiny_clip(seed=0, image_size=32),
        tmp_path / "a",
        AdaptCLIPTrainConfig(epochs=2, batch_size=4),
    )
    train_anomalyclip(
        squares,
        make_tiny_clip(seed=1, image_size=64),
        tmp_path / "p",
        AnomalyCLIPTrainConfig(epochs=1, batch_size=3),
        progress=False,
    )
    assert torch.equal(torch.random.get_rng_state(), before[0])
    assert random.getstate() == before[1]
