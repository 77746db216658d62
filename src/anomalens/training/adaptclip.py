"""AdaptCLIP training recipe: all three adapters on an auxiliary dataset, CLIP frozen.

Follows the official recipe (method spec section 6): queries are all images of the auxiliary
dataset's **test** split (normal and anomalous, with masks), all categories mixed and shuffled;
each query gets one normal prompt image drawn at random from its own category's **train** split
at every visit (K = 1). One Adam optimiser (lr 1e-3, betas (0.5, 0.999)) on the summed losses of
every head (VA, TA and each PQA layer):
``CE(logits, label) + Focal(2-channel map, mask) + Dice(abnormal, mask) + Dice(normal, 1 - mask)``.
BatchNorms use batch statistics (train mode). VA is scored against the fixed static anchors and TA
with the unadapted visual features, which is how the "alternating" adaptation is realised.

Outputs in ``out``: ``epoch_NNN.safetensors`` (every ``checkpoint_every`` epochs and the last),
``adapters.safetensors`` (final), ``last.safetensors`` + ``optimizer.pt`` + ``train_state.json``
(resume), ``loss_log.jsonl`` (one line per step).
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.data.io import load_image, load_mask
from anomalens.data.transforms import resize_mask
from anomalens.detectors._adaptclip_modules import adaptclip_heads
from anomalens.training.losses import head_loss
from anomalens.types import Sample

if TYPE_CHECKING:
    from anomalens.backbones.clip import ClipBackbone
    from anomalens.detectors.adaptclip import AdaptCLIP

__all__ = ["TrainResult", "train_adaptclip"]


# ======================================================================================= data
def _split_samples(samples: Sequence[Sample]) -> tuple[list[Sample], dict[str, list[Sample]]]:
    """Queries (test split) and the normal prompt pool of each category (train split)."""
    queries = [s for s in samples if s.split == "test"]
    if not queries:
        raise ValueError("train_adaptclip needs samples of the auxiliary dataset's 'test' split")
    pools: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.split == "train" and s.label == 0:
            pools[s.category].append(s)
    for cat in sorted({q.category for q in queries}):
        if not pools.get(cat):
            fallback = [q for q in queries if q.category == cat and q.label == 0]
            if not fallback:
                raise ValueError(
                    f"category {cat!r} has no normal image to use as a prompt (no 'train' normal "
                    "and no normal 'test' image)"
                )
            warnings.warn(
                f"category {cat!r} has no 'train' normal images; prompts are drawn from its "
                "normal test images (possible leakage)",
                UserWarning,
                stacklevel=3,
            )
            pools[cat] = fallback
    return queries, dict(pools)


def _mask(sample: Sample, size: int) -> np.ndarray:
    if sample.mask_path is None or sample.label == 0:
        return np.zeros((size, size), dtype=bool)
    return resize_mask(load_mask(sample.mask_path), size)


# =================================================================================== training
@dataclass
class TrainResult:
    """Outcome of :func:`train_adaptclip`.

    Attributes:
        checkpoint: final adapters (``out/adapters.safetensors``).
        epochs: epochs completed in total (including resumed ones).
        epoch_losses: mean total loss of every completed epoch.
        resumed_from: epoch the run resumed after (0 = fresh start).
    """

    checkpoint: Path
    epochs: int
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from: int = 0


def _read_log(path: Path, max_epoch: int) -> list[dict[str, float]]:
    """Loss log lines of epochs <= max_epoch (later ones belong to an interrupted epoch)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= max_epoch]


def train_adaptclip(
    samples: Sequence[Sample],
    backbone: str | ClipBackbone = "adaptclip-vitl14-336@518",
    out: str | Path = "runs/adaptclip",
    epochs: int = 15,
    batch_size: int = 8,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.5, 0.999),
    seed: int = 10,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    checkpoint_every: int = 1,
    resume: bool = True,
    init_checkpoint: str | Path | None = None,
    n_ctx: int = 12,
    reduction: int = 4,
    pq_mid_dim: int = 128,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the AdaptCLIP adapters.

    Args:
        samples: auxiliary dataset index: ``test`` samples are the queries (labels and masks
            used), ``train`` normal samples the prompt pools per category.
        backbone: CLIP preset name or ``ClipBackbone`` (frozen).
        out: output folder (created).
        epochs: total epochs (official 15).
        batch_size: queries per step (official 8); a last batch of one image is dropped
            (BatchNorm needs two).
        lr, betas: Adam settings (official 1e-3, (0.5, 0.999)).
        seed: seeds the adapter initialisation, the shuffling and the prompt draws.
        device, precision: where / how the backbone runs (adapters are fp32).
        checkpoint_every: write ``epoch_NNN.safetensors`` every this many epochs.
        resume: continue from ``out/train_state.json`` if present.
        init_checkpoint: adapters to start from (ignored when resuming).
        n_ctx, reduction, pq_mid_dim: adapter sizes of a fresh start.
        progress: called after every step with the loss-log row.

    Returns:
        :class:`TrainResult`.
    """
    from anomalens.detectors.adaptclip import AdaptCLIP

    if epochs < 1 or batch_size < 2 or checkpoint_every < 1:
        raise ValueError("need epochs >= 1, batch_size >= 2 and checkpoint_every >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    queries, pools = _split_samples(samples)
    state_file, log_file = out / "train_state.json", out / "loss_log.jsonl"
    start = 0
    if resume and state_file.is_file():
        start = int(json.loads(state_file.read_text())["epoch"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="AdaptCLIP adapters are untrained")
        det: AdaptCLIP = AdaptCLIP(
            backbone,
            checkpoint=(out / "last.safetensors") if start else init_checkpoint,
            device=device,
            precision=precision,
            batch_size=batch_size,
            n_ctx=n_ctx,
            reduction=reduction,
            pq_mid_dim=pq_mid_dim,
            seed=seed,
        )
    adapters = det.adapters
    adapters.train()
    optimizer = torch.optim.Adam(adapters.parameters(), lr=lr, betas=betas)
    if start:
        optimizer.load_state_dict(
            torch.load(out / "optimizer.pt", map_location=det.device, weights_only=True)
        )
    log_rows = _read_log(log_file, start)
    log_file.write_text("".join(json.dumps(r) + "\n" for r in log_rows))
    size = det.image_size
    step = len(log_rows)
    for epoch in range(start + 1, epochs + 1):
        rng = random.Random(seed * 100_003 + epoch)
        torch.manual_seed(seed * 100_003 + epoch)
        order = list(range(len(queries)))
        rng.shuffle(order)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        batches = [b for b in batches if len(b) >= 2]
        for batch in batches:
            qs = [queries[i] for i in batch]
            prompts = [rng.choice(pools[q.category]) for q in qs]
            row = _train_step(det, optimizer, qs, prompts, size)
            step += 1
            row.update({"epoch": epoch, "step": step})
            with log_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if progress is not None:
                progress(row)
        if epoch % checkpoint_every == 0 or epoch == epochs:
            det.save_checkpoint(out / f"epoch_{epoch:03d}.safetensors")
        det.save_checkpoint(out / "last.safetensors")
        torch.save(optimizer.state_dict(), out / "optimizer.pt")
        state_file.write_text(json.dumps({"epoch": epoch, "epochs": epochs, "seed": seed}))
    final = out / "adapters.safetensors"
    shutil.copyfile(out / "last.safetensors", final)
    rows = _read_log(log_file, epochs)
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        per_epoch[int(r["epoch"])].append(float(r["loss"]))
    adapters.eval()
    return TrainResult(
        checkpoint=final,
        epochs=max(per_epoch, default=start),
        epoch_losses=[float(np.mean(per_epoch[e])) for e in sorted(per_epoch)],
        resumed_from=start,
    )


def _train_step(
    det: AdaptCLIP,
    optimizer: torch.optim.Optimizer,
    queries: list[Sample],
    prompts: list[Sample],
    size: int,
) -> dict[str, float]:
    """One optimisation step on a batch of queries with one normal prompt each."""
    feats = det.encode([load_image(q.image_path) for q in queries])
    prompt_feats = det.encode([load_image(p.image_path) for p in prompts])
    memory = [F.normalize(t[:, 1:].float(), dim=-1) for t in prompt_feats.patch_tokens]
    labels = torch.tensor([int(q.label > 0) for q in queries], device=det.device)
    masks = torch.from_numpy(np.stack([_mask(q, size) for q in queries])).float().to(det.device)
    heads = adaptclip_heads(
        det.adapters,
        [t.float() for t in feats.patch_tokens],
        feats.global_embedding.float(),
        tuple(feats.grid_size),
        size,
        det.static_text,
        det.ta_text_embeddings(),
        memory,
        det.temperature,
    )
    assert heads.pq is not None  # memory was given
    parts = {
        "va": head_loss(heads.va_logits, heads.va_map, labels, masks),
        "ta": head_loss(heads.ta_logits, heads.ta_map, labels, masks),
    }
    for i, layer in enumerate(det.layers):
        parts[f"pq{layer}"] = head_loss(heads.pq.logits[:, i], heads.pq.maps[:, i], labels, masks)
    total = sum(p["global"] + p["local"] for p in parts.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()  # type: ignore[union-attr]
    optimizer.step()
    det._ta_text = None  # the TA prompts changed
    row = {"loss": float(total.detach())}  # type: ignore[union-attr]
    for name, p in parts.items():
        row[f"{name}_global"] = float(p["global"].detach())
        row[f"{name}_local"] = float(p["local"].detach())
    return row
