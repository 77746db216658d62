"""Training recipe of AnomalyCLIP's object-agnostic prompts (plain PyTorch loop).

Official recipe (spec §5, ``train.py``): CLIP frozen in eval mode, image encoding under no-grad;
only the prompt learner is trained with Adam (lr 1e-3, betas (0.5, 0.999)), 15 epochs, batch 8,
518 px squash resize, no augmentation, masks resized and thresholded at 0.5; loss
``CE(ĝ·t̂/τ, y) + 4 Σ_layers [Focal(S, m) + Dice(S_a, m) + Dice(S_n, 1 - m)]``; trained on the
test split (all classes, with masks) of one auxiliary dataset, tested zero-shot on others.

Output folder ``out``:

* ``anomalyclip_prompts.safetensors``: final prompts (load with ``AnomalyCLIP(checkpoint=...)``);
* ``epoch_NNN.safetensors``: prompts after epoch NNN (every ``checkpoint_every`` epochs);
* ``last.safetensors`` + ``optimizer.pt`` + ``train_state.json``: resume point (also written
  every ``checkpoint_every_steps`` steps); ``optimizer.pt`` holds tensors and numbers only and
  loads with ``torch.load(weights_only=True)``;
* ``losses.jsonl``: one JSON line per step (epoch, step, loss, image_loss, pixel_loss).

The batch order of epoch e is a permutation drawn from ``seed`` and e alone, so a run resumed
after an interruption (even mid-epoch) follows the same order as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalens.data.io import load_mask
from anomalens.data.transforms import resize_mask
from anomalens.detectors._anomalyclip_checkpoint import (
    load_prompt_checkpoint,
    save_prompt_checkpoint,
)
from anomalens.detectors._anomalyclip_modules import (
    PromptConfig,
    patch_text_probs,
    similarity_maps,
)
from anomalens.detectors.anomalyclip import (
    DEFAULT_BACKBONE,
    OFFICIAL_DEPTH,
    build_prompt_learner,
    default_layers,
    default_vv_start,
    encode_prompts,
)
from anomalens.scoring.similarity import DEFAULT_TEMPERATURE, image_logits
from anomalens.training.losses import anomalyclip_loss
from anomalens.types import Sample

__all__ = ["FINAL_NAME", "train_anomalyclip"]

log = logging.getLogger(__name__)

#: File name of the final prompts in the output folder.
FINAL_NAME = "anomalyclip_prompts.safetensors"
_STATE = "train_state.json"
_LAST = "last.safetensors"
_OPTIM = "optimizer.pt"
_LOG = "losses.jsonl"


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shuffled sample order of one epoch, a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def _load_masks(samples: Sequence[Sample], size: int) -> torch.Tensor:
    """(B, S, S) float {0, 1} masks: resized bilinearly and thresholded at 0.5; zeros if none."""
    out = np.zeros((len(samples), size, size), dtype=np.float32)
    for i, s in enumerate(samples):
        if s.mask_path is not None and s.label == 1:
            out[i] = resize_mask(load_mask(s.mask_path), size)
    return torch.from_numpy(out)


def _check_samples(samples: Sequence[Sample]) -> None:
    if not samples:
        raise ValueError("train_anomalyclip got no training sample")
    bad = [str(s.image_path) for s in samples if s.label not in (0, 1)]
    if bad:
        raise ValueError(
            f"AnomalyCLIP training needs labelled samples (0 normal / 1 anomalous); unlabelled: "
            f"{bad[:3]}{' ...' if len(bad) > 3 else ''}"
        )
    if not any(s.label == 1 and s.mask_path is not None for s in samples):
        raise ValueError(
            "AnomalyCLIP training needs anomalous samples with masks (use the test split of an "
            "annotated auxiliary dataset, as the official protocol does)"
        )


def _write_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / (_STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(out / _STATE)


def _save_resume_point(
    out: Path,
    learner: torch.nn.Module,
    config: PromptConfig,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    save_prompt_checkpoint(out / _LAST, learner.state_dict(), config, extra=state["settings"])
    tmp = out / (_OPTIM + ".tmp")
    torch.save(optimizer.state_dict(), tmp)
    tmp.replace(out / _OPTIM)
    _write_state(out, state)


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the log lines of steps <= ``last_step`` (drop steps redone after a resume)."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def train_anomalyclip(
    train_samples: Sequence[Sample],
    backbone: Any = DEFAULT_BACKBONE,
    out: str | Path = "runs/anomalyclip",
    epochs: int = 15,
    lr: float = 1e-3,
    batch_size: int = 8,
    image_size: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    vv_start: int | None = None,
    n_ctx: int = 12,
    depth: int | None = None,
    t_n_ctx: int = 4,
    pixel_weight: float = 4.0,
    temperature: float = DEFAULT_TEMPERATURE,
    betas: tuple[float, float] = (0.5, 0.999),
    seed: int = 111,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    checkpoint_every: int = 1,
    checkpoint_every_steps: int | None = None,
    cache_features: bool = False,
    fp16_deep_prompts: bool = True,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Train AnomalyCLIP's prompt learner on labelled, annotated samples.

    Args:
        train_samples: images with labels (0/1) and masks (anomalous ones), all categories mixed
            (official: the test split of the auxiliary dataset).
        backbone: CLIP preset name or a ``ClipBackbone`` (frozen; its image size is changed to
            ``image_size`` if given).
        out: output folder (see the module docstring).
        epochs: total epochs (official 15).
        lr: Adam learning rate (official 1e-3).
        batch_size: images per step (official 8).
        image_size: input side S (official 518); None keeps the backbone's.
        layers: tapped blocks whose maps enter the loss (default: last block; official train.py
            default (6, 12, 18, 24), train.sh 24).
        vv_start: first V-V block (default 6 for 24 blocks).
        n_ctx, depth, t_n_ctx: prompt sizes (official 12, 9, 4; depth capped by the text tower).
        pixel_weight: λ of the map losses (official 4).
        temperature: τ (official 0.07).
        betas: Adam betas (official (0.5, 0.999)).
        seed: prompt initialisation and shuffling seed (official 111).
        pretrained: override of the preset's CLIP weights.
        device: torch device.
        checkpoint_every: write ``epoch_NNN.safetensors`` and a resume point every this many
            epochs (the last epoch is always written).
        checkpoint_every_steps: also write a resume point every this many steps (None: never).
        cache_features: keep each image's encoder outputs in memory after its first visit (the
            encoder is frozen and there is no augmentation, so results are unchanged; memory:
            images x layers x (1+N) x D floats).
        fp16_deep_prompts: official float16 rounding of the deep prompts.
        resume: continue from ``out/train_state.json`` when present (settings must match);
            False starts over and overwrites.
        progress: show a tqdm progress bar.

    Returns:
        Path of the final prompts (``out/anomalyclip_prompts.safetensors``).

    Raises:
        ValueError: bad samples or settings, or a resume state with different settings.
    """
    from anomalens.backbones.clip import ClipBackbone

    _check_samples(train_samples)
    if epochs < 1 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError("epochs, batch_size and checkpoint_every must be >= 1")
    dev = torch.device(device)
    if isinstance(backbone, str):
        overrides: dict[str, Any] = {"device": str(dev)}
        if pretrained is not None:
            overrides["pretrained"] = pretrained
        if image_size is not None:
            overrides["image_size"] = image_size
        bb = ClipBackbone.from_preset(backbone, **overrides)
        backbone_name = backbone
    else:
        bb = backbone.to(dev)
        backbone_name = bb.model_name or type(bb).__name__
        if image_size is not None and image_size != bb.image_size:
            bb.set_image_size(image_size)
    bb.eval().requires_grad_(False)
    size = int(bb.image_size)
    num_blocks = int(bb.num_layers)
    layer_t = tuple(int(i) for i in (layers or default_layers(num_blocks)))
    vv = int(vv_start) if vv_start is not None else default_vv_start(num_blocks)
    if depth is None:
        depth = min(OFFICIAL_DEPTH, int(bb.num_text_layers))
    config = PromptConfig(text_width=int(bb.text_width), n_ctx=n_ctx, depth=depth, t_n_ctx=t_n_ctx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        learner = build_prompt_learner(bb, config, fp16_deep_prompts)
    learner.to(dev).train()
    optimizer = torch.optim.Adam(learner.parameters(), lr=lr, betas=betas)
    settings: dict[str, Any] = {
        "backbone": backbone_name,
        "image_size": size,
        "layers": list(layer_t),
        "vv_start": vv,
        "lr": lr,
        "betas": list(betas),
        "batch_size": batch_size,
        "pixel_weight": pixel_weight,
        "temperature": temperature,
        "seed": seed,
        "num_samples": len(train_samples),
        "fp16_deep_prompts": fp16_deep_prompts,
        **config.to_dict(),
    }

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(train_samples)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    epoch, batch_idx, step = 0, 0, 0  # next epoch / batch to run, steps done
    if resume and (out / _STATE).is_file():
        state = json.loads((out / _STATE).read_text())
        old = state.get("settings", {})
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(
                f"cannot resume {out / _STATE}: settings differ {diff}; use another output "
                "folder or resume=False to start over"
            )
        sd, _ = load_prompt_checkpoint(out / _LAST)
        learner.load_state_dict(sd, strict=True)
        optimizer.load_state_dict(torch.load(out / _OPTIM, map_location=dev, weights_only=True))
        epoch, batch_idx, step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        log.info("resuming AnomalyCLIP training at epoch %d, batch %d", epoch + 1, batch_idx)
        _truncate_log(out / _LOG, step)
    else:
        for name in (_STATE, _LAST, _OPTIM, _LOG):
            (out / name).unlink(missing_ok=True)

    def resume_state() -> dict[str, Any]:
        return {
            "epoch": epoch,
            "batch": batch_idx,
            "step": step,
            "epochs": epochs,
            "settings": settings,
        }

    cache: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def encode(indices: list[int]) -> tuple[list[torch.Tensor], torch.Tensor, tuple[int, int]]:
        todo = [i for i in indices if i not in cache]
        if todo:
            x = bb.preprocess([train_samples[i].image_path for i in todo])
            with torch.no_grad():
                f = bb.encode_image(x.to(dev), layers=layer_t, vv_start=vv)
            for j, i in enumerate(todo):
                cache[i] = ([t[j] for t in f.patch_tokens], f.global_embedding[j])
        tokens = [
            torch.stack([cache[i][0][k] for i in indices]).to(dev) for k in range(len(layer_t))
        ]
        glob = torch.stack([cache[i][1] for i in indices]).to(dev)
        if not cache_features:
            cache.clear()
        return tokens, glob, bb.grid_size

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, initial=step, desc="anomalyclip", unit="step")
    try:
        with (out / _LOG).open("a") as log_file:
            while epoch < epochs:
                order = _epoch_order(n, seed, epoch)
                while batch_idx < steps_per_epoch:
                    idx = order[batch_idx * batch_size : (batch_idx + 1) * batch_size]
                    batch = [train_samples[i] for i in idx]
                    tokens, glob, grid = encode(idx)
                    labels = torch.tensor([s.label for s in batch], device=dev)
                    masks = _load_masks(batch, size).to(dev)
                    text = encode_prompts(bb, learner)
                    logits = image_logits(glob, text, temperature)
                    maps = [
                        similarity_maps(patch_text_probs(t, text, temperature), grid, size)
                        for t in tokens
                    ]
                    losses = anomalyclip_loss(logits, labels, maps, masks, pixel_weight)
                    optimizer.zero_grad(set_to_none=True)
                    losses["loss"].backward()
                    optimizer.step()
                    batch_idx += 1
                    step += 1
                    row = {"epoch": epoch + 1, "step": step, "time": round(time.time(), 3)}
                    row.update({k: round(float(v.detach()), 6) for k, v in losses.items()})
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{row['loss']:.4f}")
                    if checkpoint_every_steps and step % checkpoint_every_steps == 0:
                        _save_resume_point(out, learner, config, optimizer, resume_state())
                epoch += 1
                batch_idx = 0
                if epoch % checkpoint_every == 0 or epoch == epochs:
                    save_prompt_checkpoint(
                        out / f"epoch_{epoch:03d}.safetensors",
                        learner.state_dict(),
                        config,
                        extra={**settings, "epoch": epoch},
                    )
                    _save_resume_point(out, learner, config, optimizer, resume_state())
    finally:
        if bar is not None:
            bar.close()
    final = save_prompt_checkpoint(
        out / FINAL_NAME, learner.state_dict(), config, extra={**settings, "epoch": epochs}
    )
    return final
