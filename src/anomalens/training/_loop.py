"""One training loop for the learned parts of a frozen CLIP (AdaptCLIP adapters, AnomalyCLIP prompts).

Plain PyTorch. A recipe (:class:`Recipe`) supplies the module to train, its epoch plan, the
losses of one batch and how its weights are saved and loaded. The loop supplies the rest, once
for both methods:

* Adam on the module's parameters;
* resume from ``train_state.json``, refused (naming every differing setting) when the run in
  that folder was made with other settings;
* atomic resume points: ``optimizer.pt``, ``last.safetensors`` and then ``train_state.json``,
  after every epoch and every ``checkpoint_every_steps`` steps; ``epoch_NNN.safetensors`` every
  ``checkpoint_every`` epochs and after the last; the final weights under the recipe's name;
* one JSON line per step in the recipe's loss log (cut back to the resume point on resume);
* progress as a tqdm bar or a callback per step.

Randomness: the plan of epoch ``e`` must be a function of the settings and ``e`` only (each
recipe draws it from its own generator seeded with ``(seed, e)``), so a run resumed after an
interruption, even mid-epoch, repeats an uninterrupted one exactly. The global random number
generators are neither reseeded nor used by the loop.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from anomalens.data.io import load_mask
from anomalens.data.transforms import resize_mask
from anomalens.detectors._checkpoint import read_info
from anomalens.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from anomalens.types import Sample

if TYPE_CHECKING:
    from anomalens.backbones.clip import ClipBackbone

__all__ = [
    "LAST_NAME",
    "OPTIMIZER_NAME",
    "STATE_NAME",
    "ProgressFn",
    "Recipe",
    "TrainConfig",
    "TrainResult",
    "frozen_backbone",
    "load_masks",
    "run_training",
]

log = logging.getLogger(__name__)

STATE_NAME = "train_state.json"
LAST_NAME = "last.safetensors"
OPTIMIZER_NAME = "optimizer.pt"

#: Called after every step with the loss-log row (epoch, step, time and every loss term).
ProgressFn = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by the training recipes (each method extends it).

    Attributes:
        epochs: total epochs (official 15); a resumed run continues up to this number.
        batch_size: images per step (official 8).
        lr: Adam learning rate (official 1e-3).
        betas: Adam betas (official (0.5, 0.999)).
        seed: seed of the initialisation and of every epoch's plan.
        device: torch device of the backbone and of the trained module.
        image_size: input side S (None keeps the backbone's).
        pretrained: override of the preset's CLIP weights (backbone given by name only).
        checkpoint_every: write ``epoch_NNN.safetensors`` every this many epochs (and the last).
        checkpoint_every_steps: also write a resume point every this many steps (None: only at
            the end of every epoch).
        resume: continue the run found in the output folder (its settings must match); False
            starts over and overwrites it.
    """

    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    device: str = "cpu"
    image_size: int | None = None
    pretrained: str | None = None
    checkpoint_every: int = 1
    checkpoint_every_steps: int | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        bad = [
            f"{name}={getattr(self, name)}"
            for name in ("epochs", "batch_size", "checkpoint_every")
            if getattr(self, name) < 1
        ]
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            bad.append(f"checkpoint_every_steps={self.checkpoint_every_steps}")
        if bad:
            raise ValueError(f"training settings must be >= 1: {', '.join(bad)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class TrainResult:
    """Outcome of a training run.

    Attributes:
        checkpoint: the final weights (load them with the detector's ``checkpoint=``).
        epochs: epochs completed in total (including resumed ones).
        steps: optimisation steps completed in total.
        epoch_losses: mean total loss of every completed epoch (from the loss log).
        resumed_from: completed epochs found at the start (0 = fresh start).
    """

    checkpoint: Path
    epochs: int
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from: int = 0


class Recipe(Protocol):
    """What one method's training contributes to :func:`run_training`."""

    #: File name of the loss log in the output folder.
    log_name: str
    #: File name of the final weights in the output folder.
    final_name: str

    @property
    def module(self) -> nn.Module:
        """The module being trained (read again after :meth:`load`, which may replace it)."""
        ...

    def plan(self, epoch: int) -> Sequence[Any]:
        """Batches of epoch ``epoch`` (0-based), a function of the settings and ``epoch`` only."""
        ...

    def losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """Scalar losses of one batch; ``loss`` is the one back-propagated."""
        ...

    def save(self, path: Path, extra: Mapping[str, Any]) -> None:
        """Write the weights (atomically) with ``extra`` in the metadata."""
        ...

    def load(self, path: Path) -> None:
        """Read weights written by :meth:`save`."""
        ...


def frozen_backbone(
    backbone: str | ClipBackbone, config: TrainConfig, precision: str | None = None
) -> tuple[ClipBackbone, str]:
    """The frozen CLIP a recipe trains on, in eval mode without gradients.

    Args:
        backbone: preset name (built with ``config.image_size`` / ``config.pretrained``) or a
            ready ``ClipBackbone`` (moved to the device; resized when ``config.image_size``
            differs).
        config: the run's settings.
        precision: backbone precision (None: fp32 for a name, its own for a ready backbone).

    Returns:
        (backbone, name recorded in the settings and checkpoints).
    """
    from anomalens.backbones.clip import ClipBackbone, build_clip_backbone

    if isinstance(backbone, str):
        overrides: dict[str, Any] = {"device": config.device, "precision": precision or "fp32"}
        if config.pretrained is not None:
            overrides["pretrained"] = config.pretrained
        if config.image_size is not None:
            overrides["image_size"] = config.image_size
        bb, name = ClipBackbone.from_preset(backbone, **overrides), backbone
    else:
        bb, name = build_clip_backbone(backbone, device=config.device, precision=precision)  # type: ignore[arg-type]
        if config.image_size is not None and config.image_size != bb.image_size:
            bb.set_image_size(config.image_size)
    bb.eval().requires_grad_(False)
    return bb, name


def load_masks(samples: Sequence[Sample], size: int) -> torch.Tensor:
    """(B, S, S) float {0, 1} ground truth: masks resized and thresholded at 0.5 (``resize_mask``);
    zeros for normal samples and samples without a mask."""
    out = np.zeros((len(samples), size, size), dtype=np.float32)
    for i, s in enumerate(samples):
        if s.mask_path is not None and s.label > 0:
            out[i] = resize_mask(load_mask(s.mask_path), size)
    return torch.from_numpy(out)


def _settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: run {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)
    ]


def _read_resume_state(out: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The resume state in ``out``, after checking it was made with ``settings``.

    Raises:
        ValueError: the state is unreadable, has no settings (written by an older version) or
            other settings; or the weights do not belong to the same step.
    """
    path = out / STATE_NAME
    try:
        state = json.loads(path.read_text())
        epoch, batch, step = int(state["epoch"]), int(state["batch"]), int(state["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"cannot resume from {path}: not a resume state of this version ({exc!r}); use "
            "another output folder or resume=False to start over"
        ) from exc
    if "settings" not in state:
        raise ValueError(
            f"cannot resume from {path}: it records no settings to check; use another output "
            "folder or resume=False to start over"
        )
    diff = _settings_diff(state["settings"], settings)
    if diff:
        raise ValueError(
            f"cannot resume {path}: settings differ ({'; '.join(diff)}); use another output "
            "folder or resume=False to start over"
        )
    if not (out / LAST_NAME).is_file():
        raise ValueError(
            f"cannot resume from {path}: {out / LAST_NAME} is missing; use resume=False to start over"
        )
    weights_step = read_info(out / LAST_NAME).extra.get("step")
    if weights_step is not None and int(weights_step) != step:
        raise ValueError(
            f"cannot resume from {out}: {LAST_NAME} is at step {weights_step} but {STATE_NAME} "
            f"at step {step} (interrupted while saving); use resume=False to start over"
        )
    return {"epoch": epoch, "batch": batch, "step": step}


def _read_log(path: Path) -> list[dict[str, Any]]:
    """Rows of the loss log; a line cut short by an interruption is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the log rows of steps <= ``last_step`` (drop the steps redone after a resume)."""
    keep = [r for r in _read_log(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _epoch_losses(path: Path) -> list[float]:
    """Mean ``loss`` of every epoch in the loss log."""
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for row in _read_log(path):
        per_epoch[int(row["epoch"])].append(float(row["loss"]))
    return [sum(v) / len(v) for _, v in sorted(per_epoch.items())]


def run_training(
    recipe: Recipe,
    out: str | Path,
    config: TrainConfig,
    settings: Mapping[str, Any],
    *,
    progress: bool | ProgressFn = False,
    desc: str = "train",
) -> TrainResult:
    """Train ``recipe.module`` with Adam; checkpoints, resume and loss log in ``out``.

    Args:
        recipe: the method's plan, losses and weight files.
        out: output folder (created).
        config: shared settings (epochs, optimiser, checkpoints, resume).
        settings: everything that determines the result (checked on resume; written into every
            checkpoint's metadata). JSON-serialisable.
        progress: True for a tqdm bar, a callable for a callback per step, False for nothing.
        desc: label of the progress bar.

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: no batch to train on, a resume state with other settings, or one that
            already ran more epochs.
    """
    if not recipe.plan(0):
        raise ValueError(
            f"nothing to train on: no batch of batch_size={config.batch_size} can be formed "
            "from the samples given"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(dict(settings)))  # the form it takes in the state file
    log_path = out / recipe.log_name
    pos = {"epoch": 0, "batch": 0, "step": 0}  # completed epochs, batches of the next, steps
    if config.resume and (out / STATE_NAME).is_file():
        pos = _read_resume_state(out, settings)
        if pos["epoch"] > config.epochs:
            raise ValueError(
                f"the run in {out} already completed {pos['epoch']} epochs, more than the "
                f"{config.epochs} asked for; ask for more epochs or use resume=False"
            )
        recipe.load(out / LAST_NAME)
        log.info("resuming training at epoch %d, batch %d", pos["epoch"] + 1, pos["batch"])
        _truncate_log(log_path, pos["step"])
    else:
        for name in (STATE_NAME, LAST_NAME, OPTIMIZER_NAME, recipe.log_name):
            (out / name).unlink(missing_ok=True)
    resumed_from = pos["epoch"]
    module = recipe.module
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr, betas=config.betas)
    if pos["step"]:
        optimizer.load_state_dict(
            torch.load(out / OPTIMIZER_NAME, map_location=config.device, weights_only=True)
        )

    def extra() -> dict[str, Any]:
        return {**pos, "epochs": config.epochs, "settings": settings}

    def save_resume_point() -> None:
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        atomic_write_bytes(out / OPTIMIZER_NAME, buf.getvalue())
        recipe.save(out / LAST_NAME, extra())
        atomic_write_json(out / STATE_NAME, extra())  # last: it commits the resume point

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        total = sum(len(recipe.plan(e)) for e in range(config.epochs))
        bar = tqdm(total=total, initial=pos["step"], desc=desc, unit="step")
    try:
        with log_path.open("a") as log_file:
            while pos["epoch"] < config.epochs:
                plan = recipe.plan(pos["epoch"])
                while pos["batch"] < len(plan):
                    losses = recipe.losses(plan[pos["batch"]])
                    optimizer.zero_grad(set_to_none=True)
                    losses["loss"].backward()
                    optimizer.step()
                    pos["batch"] += 1
                    pos["step"] += 1
                    row = {"epoch": pos["epoch"] + 1, "step": pos["step"], "time": time.time()}
                    row.update({k: float(v.detach()) for k, v in losses.items()})
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(epoch=row["epoch"], loss=f"{row['loss']:.4f}")
                    elif callable(progress):
                        progress(row)
                    every = config.checkpoint_every_steps
                    if every and pos["step"] % every == 0 and pos["batch"] < len(plan):
                        save_resume_point()
                pos["epoch"] += 1
                pos["batch"] = 0
                if pos["epoch"] % config.checkpoint_every == 0 or pos["epoch"] == config.epochs:
                    recipe.save(out / f"epoch_{pos['epoch']:03d}.safetensors", extra())
                save_resume_point()
    finally:
        if bar is not None:
            bar.close()
    module.eval()
    final = out / recipe.final_name
    recipe.save(final, extra())
    losses_per_epoch = _epoch_losses(log_path)
    return TrainResult(
        checkpoint=final,
        epochs=pos["epoch"],
        steps=pos["step"],
        epoch_losses=losses_per_epoch,
        resumed_from=resumed_from,
    )
