"""MetaUAS training recipe: change segmentation learned from synthetic pairs of normal images.

The official training code is not released. What is known (method spec section 8): the encoder
is frozen, the alignment modules, decoder and head are trained once on synthetic image pairs
with object-level and local-region changes, independent of any anomaly dataset; the loss
reported by a third-party reproduction is binary cross-entropy on the change map (AdamW, lr 1e-4,
weight decay 5e-4, 30 epochs, 256 px). This module implements that recipe from normal images
only (no COCO inpainting data offline):

* prompt = a normal image A, slightly moved (random affine: rotation, shift, scale) and with
  a brightness change, so that the alignment has something to align (our choice);
* query = A with one change inside an irregular region (smooth-noise blob): ``paste`` (the
  region taken from another normal image B), ``blend`` (A and B mixed with a random factor,
  DRAEM-style), ``deform`` (A warped locally by a smooth displacement field), or ``none``
  (A unchanged: an all-zero target);
* target = the region (for ``deform``: the pixels the warp actually changed).

Outputs in ``out``: ``epoch_NNN.safetensors`` (every ``checkpoint_every`` epochs and the last),
``metauas.safetensors`` (final), ``last.safetensors`` + ``optimizer.pt`` + ``train_state.json``
(resume), ``loss_log.jsonl`` (one line per step).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.data.io import ImageLike
from anomalens.fileio import atomic_write_bytes, atomic_write_text

__all__ = [
    "CHANGE_KINDS",
    "TrainResult",
    "calibrate_encoder_bn",
    "jitter_prompt",
    "load_encoder_weights",
    "make_change_pair",
    "random_region",
    "smooth_noise",
    "train_metauas",
]

CHANGE_KINDS = ("paste", "blend", "deform", "none")
#: Probability of each change kind (same order as ``CHANGE_KINDS``); our choice.
CHANGE_PROBS = (0.3, 0.3, 0.25, 0.15)


# ============================================================================ synthetic changes
def _rand(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def smooth_noise(gen: torch.Generator, size: int, cells: int, channels: int = 1) -> torch.Tensor:
    """Smooth random field: a (cells x cells) uniform grid upsampled bicubically.

    Returns:
        (channels, size, size) float32, roughly in [0, 1].
    """
    low = torch.rand((1, channels, cells, cells), generator=gen)
    return F.interpolate(low, (size, size), mode="bicubic", align_corners=False)[0]


def random_region(gen: torch.Generator, size: int) -> torch.Tensor:
    """An irregular blob: a random ellipse intersected with a thresholded smooth-noise field.

    Returns:
        (size, size) bool mask covering roughly 0.3-12 % of the image, never empty.
    """
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(8):
        cy, cx = _rand(gen, 0.15, 0.85) * size, _rand(gen, 0.15, 0.85) * size
        ry, rx = _rand(gen, 0.05, 0.25) * size, _rand(gen, 0.05, 0.25) * size
        ang = _rand(gen, 0, math.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * math.cos(ang) + dy * math.sin(ang)) / rx
        v = (-dx * math.sin(ang) + dy * math.cos(ang)) / ry
        ellipse = u**2 + v**2 <= 1.0
        noise = smooth_noise(gen, size, int(torch.randint(3, 9, (), generator=gen)))[0]
        mask = ellipse & (noise > _rand(gen, 0.3, 0.55))
        if int(mask.sum()) >= max(4, size * size // 400):
            return mask
    return ellipse


def _warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample (3, S, S) ``image`` at identity + ``flow`` (2, S, S) in normalised units."""
    s = image.shape[-1]
    base = torch.linspace(-1, 1, s)
    gy, gx = torch.meshgrid(base, base, indexing="ij")
    grid = torch.stack([gx + flow[0], gy + flow[1]], dim=-1)[None]
    return F.grid_sample(
        image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=True
    )[0]


def make_change_pair(
    a: torch.Tensor, b: torch.Tensor, gen: torch.Generator, kind: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Query with one synthetic change, from normal image ``a`` and donor image ``b``.

    Args:
        a: (3, S, S) normal image in [0, 1].
        b: (3, S, S) another normal image in [0, 1] (the paste / blend source).
        gen: random generator.
        kind: one of ``CHANGE_KINDS``; None draws one with ``CHANGE_PROBS``.

    Returns:
        (query (3, S, S) in [0, 1], change mask (S, S) float {0, 1}, kind).
    """
    s = a.shape[-1]
    if kind is None:
        kind = CHANGE_KINDS[int(torch.multinomial(torch.tensor(CHANGE_PROBS), 1, generator=gen))]
    if kind == "none":
        return a.clone(), torch.zeros(s, s), kind
    region = random_region(gen, s)
    m = region.float()[None]
    if kind in ("paste", "blend"):
        # a random place of the donor, so that the pasted content is not aligned with A
        shift = (int(torch.randint(s, (), generator=gen)), int(torch.randint(s, (), generator=gen)))
        donor = torch.roll(b, shifts=shift, dims=(1, 2))
        beta = 1.0 if kind == "paste" else _rand(gen, 0.35, 0.8)
        query = a * (1 - m) + (beta * donor + (1 - beta) * a) * m
        changed = (query - a).abs().amax(0) > 0.02
        mask = region & changed
        if int(mask.sum()) < 4:  # donor too similar to A here: fall back to a deformation
            return make_change_pair(a, b, gen, "deform")
        return query, mask.float(), kind
    if kind == "deform":
        amp = _rand(gen, 0.04, 0.12)  # up to ~6 % of the side, in normalised units
        soft = F.avg_pool2d(m[None], 5, stride=1, padding=2)[0]
        flow = (smooth_noise(gen, s, 4, channels=2) - 0.5) * 2 * amp * soft
        query = _warp(a, flow)
        mask = (query - a).abs().amax(0) > 0.04
        if int(mask.sum()) < 4:  # flat image: the warp changed nothing visible
            query = a * (1 - m) + (1 - a) * m  # invert the region instead
            mask = region
        return query.clamp(0, 1), mask.float(), kind
    raise ValueError(f"unknown change kind {kind!r}; choose from {CHANGE_KINDS}")


def jitter_prompt(
    a: torch.Tensor,
    gen: torch.Generator,
    max_rotation_deg: float = 5.0,
    max_shift: float = 0.04,
    max_scale: float = 0.05,
    max_brightness: float = 0.06,
) -> torch.Tensor:
    """The prompt: ``a`` under a small random affine transform and brightness change.

    Args:
        a: (3, S, S) in [0, 1].
        max_shift: as a fraction of the side.

    Returns:
        (3, S, S) in [0, 1].
    """
    ang = math.radians(_rand(gen, -max_rotation_deg, max_rotation_deg))
    sc = 1.0 + _rand(gen, -max_scale, max_scale)
    tx, ty = (_rand(gen, -max_shift, max_shift) * 2 for _ in range(2))
    theta = torch.tensor(
        [
            [sc * math.cos(ang), -sc * math.sin(ang), tx],
            [sc * math.sin(ang), sc * math.cos(ang), ty],
        ]
    )
    grid = F.affine_grid(theta[None], [1, *a.shape], align_corners=False)
    out = F.grid_sample(a[None], grid, padding_mode="reflection", align_corners=False)[0]
    return (out + _rand(gen, -max_brightness, max_brightness)).clamp(0, 1)


# ================================================================================ encoder weights
def load_encoder_weights(net: torch.nn.Module, path: str | Path) -> None:
    """Load ImageNet (or other) EfficientNet-B4 weights into ``net.encoder``.

    Accepts timm ``tf_efficientnet_b4`` state dicts and efficientnet-pytorch ones (the official
    MetaUAS encoder, ``efficientnet-b4-*.pth``), with or without an ``encoder.`` prefix; the
    classifier and head tensors are ignored.

    Raises:
        KeyError: an encoder tensor is missing or unknown.
    """
    from anomalens.backbones.weights import read_checkpoint
    from anomalens.detectors._metauas_checkpoint import _encoder_key

    raw, _ = read_checkpoint(path, "EfficientNet-B4 weights")
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        k = key.removeprefix("module.").removeprefix("encoder.")
        if k.startswith(("_fc.", "classifier.", "conv_head.", "bn2.")):
            continue
        if k.startswith("_"):
            mapped = _encoder_key(k)
            if mapped is None:
                continue
            k = mapped.removeprefix("encoder.")
        state[k] = value
    try:
        net.encoder.load_state_dict(state, strict=True)  # type: ignore[union-attr]
    except RuntimeError as exc:
        raise KeyError(f"{path} is not an EfficientNet-B4 state dict: {exc}") from exc


@torch.no_grad()
def calibrate_encoder_bn(
    net: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> None:
    """Set the encoder's BatchNorm running statistics from ``images`` (cumulative average).

    For a *random* encoder only: its initial statistics (mean 0, variance 1) let the features
    shrink block after block (f5 ~1e-4 of f1 at 64 px), so the aligned levels carry almost no
    signal. Recomputing them layer by layer from the training images keeps every level at unit
    scale; the weights stay random and frozen.

    Args:
        net: a ``MetaUASNet``.
        images: (N, 3, S, S) uint8 images.
    """
    encoder = cast(torch.nn.Module, net.encoder)
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        torch.nn.Module.train(m, True)
    try:
        for i in range(0, images.shape[0], batch_size):
            net.encode((images[i : i + batch_size].float() / 255.0).to(device))  # type: ignore[operator]
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
            torch.nn.Module.train(m, False)


# ======================================================================================= training
@dataclass
class TrainResult:
    """Outcome of :func:`train_metauas`.

    Attributes:
        checkpoint: final weights (``out/metauas.safetensors``).
        epochs: epochs completed in total (including resumed ones).
        epoch_losses: mean loss of every completed epoch.
        resumed_from: epoch the run resumed after (0 = fresh start).
    """

    checkpoint: Path
    epochs: int
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from: int = 0


def _read_log(path: Path, max_epoch: int) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= max_epoch]


def _batch(
    images: torch.Tensor,
    order: list[int],
    gen: torch.Generator,
    peers: list[list[int]] | None = None,
    other_prompt: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Synthetic (prompts, queries, masks) for the images ``order``.

    The query is image A with one change; the donor B is any other image. The prompt is A,
    or (with probability ``other_prompt``, when A has peers) another normal image of A's
    group; either way moved slightly by ``jitter_prompt``.
    """
    n = images.shape[0]
    prompts, queries, masks, kinds = [], [], [], []
    for i in order:
        a = images[i].float() / 255.0
        j = int(torch.randint(n - 1, (), generator=gen))
        b = images[j + (j >= i)].float() / 255.0
        query, mask, kind = make_change_pair(a, b, gen)
        source = a
        if peers is not None and peers[i] and float(torch.rand((), generator=gen)) < other_prompt:
            pick = peers[i][int(torch.randint(len(peers[i]), (), generator=gen))]
            source = images[pick].float() / 255.0
        prompts.append(jitter_prompt(source, gen))
        queries.append(query)
        masks.append(mask)
        kinds.append(kind)
    return torch.stack(prompts), torch.stack(queries), torch.stack(masks), kinds


def _load_uint8(images: Sequence[ImageLike], size: int) -> torch.Tensor:
    """All training images at (size, size), uint8 (N, 3, S, S), the detector's resize."""
    from anomalens.detectors.metauas import load_images

    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for i, im in enumerate(images):
        out[i] = (load_images([im], size)[0] * 255.0).round().to(torch.uint8)
    return out


def train_metauas(
    images: Sequence[ImageLike],
    out: str | Path = "runs/metauas",
    *,
    image_size: int = 256,
    epochs: int = 30,
    batch_size: int = 8,
    lr: float = 1e-4,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    checkpoint_every: int = 1,
    resume: bool = True,
    init_checkpoint: str | Path | None = None,
    encoder_weights: str | Path | None = None,
    groups: Sequence[str] | None = None,
    other_prompt: float = 0.5,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train MetaUAS (alignment, decoder, head; encoder frozen) on synthetic change pairs.

    Args:
        images: normal images (any categories; paths, arrays or PIL images), read once.
        out: output folder (created).
        image_size: working size S (multiple of 32).
        epochs: total epochs; one epoch = one synthetic pair per image.
        batch_size: pairs per step (>= 2: the decoder's BatchNorms use batch statistics).
        lr, weight_decay: AdamW settings (third-party reproduction: 1e-4, 5e-4).
        seed: seeds the initialisation, the order and every synthetic pair (a resumed run
            draws the same pairs as an uninterrupted one).
        device: where the network runs.
        checkpoint_every: write ``epoch_NNN.safetensors`` every this many epochs.
        resume: continue from ``out/train_state.json`` if present.
        init_checkpoint: MetaUAS weights to start from (official or ours; ignored on resume).
        encoder_weights: EfficientNet-B4 weights for the frozen encoder of a fresh start (the
            paper's is ImageNet-pretrained); None keeps the random encoder (warns).
        groups: a group (category) per image; then the prompt of a pair is, with probability
            ``other_prompt``, another normal image of the query's group instead of the
            query's own source image, so that normal variation between two samples is not
            learned as change (our choice; the paper's pairing is unknown).
        other_prompt: see ``groups``.
        progress: called after every step with the loss-log row.

    Returns:
        :class:`TrainResult`.
    """
    from anomalens.detectors.metauas import MetaUAS

    if epochs < 1 or batch_size < 2 or checkpoint_every < 1:
        raise ValueError("need epochs >= 1, batch_size >= 2 and checkpoint_every >= 1")
    images = list(images)
    if len(images) < 2:
        raise ValueError(f"train_metauas needs at least 2 normal images, got {len(images)}")
    peers: list[list[int]] | None = None
    if groups is not None:
        if len(groups) != len(images):
            raise ValueError(f"{len(images)} images but {len(groups)} group labels")
        members: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            members[g].append(i)
        peers = [[j for j in members[g] if j != i] for i, g in enumerate(groups)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_file, log_file = out / "train_state.json", out / "loss_log.jsonl"
    start = 0
    if resume and state_file.is_file():
        start = int(json.loads(state_file.read_text())["epoch"])
    fresh = start == 0 and init_checkpoint is None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MetaUAS has random weights")
        det = MetaUAS(
            (out / "last.safetensors") if start else init_checkpoint,
            image_size=image_size,
            seed=seed,
            device=device,
        )
    net = det.net
    det.weights_source = "anomalens-trained"
    if fresh:
        if encoder_weights is not None:
            load_encoder_weights(net, encoder_weights)
        else:
            warnings.warn(
                "training MetaUAS on a random frozen encoder (its BatchNorm statistics are set "
                "from the training images; pass encoder_weights= an EfficientNet-B4 ImageNet "
                "state dict for the paper's setting)",
                UserWarning,
                stacklevel=2,
            )
    data = _load_uint8(images, image_size)
    if fresh and encoder_weights is None:
        calibrate_encoder_bn(net, data, batch_size, det.device)
    net.train()  # the encoder stays in eval mode (frozen)
    trainable = [p for n, p in net.named_parameters() if not n.startswith("encoder.")]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    if start:
        optimizer.load_state_dict(
            torch.load(out / "optimizer.pt", map_location=det.device, weights_only=True)
        )
    log_rows = _read_log(log_file, start)
    atomic_write_text(log_file, "".join(json.dumps(r) + "\n" for r in log_rows))
    step = len(log_rows)
    for epoch in range(start + 1, epochs + 1):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=gen).tolist()
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in (b for b in batches if len(b) >= 2):
            prompts, queries, masks, kinds = _batch(data, batch, gen, peers, other_prompt)
            with torch.no_grad():
                qf = net.encode(queries.to(det.device))
                pf = net.encode(prompts.to(det.device))
            logits = net.decode(qf, pf)[:, 0]
            loss = F.binary_cross_entropy_with_logits(logits, masks.to(det.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            row: dict[str, float] = {"epoch": epoch, "step": step, "loss": float(loss.detach())}
            for k in CHANGE_KINDS:
                row[f"n_{k}"] = kinds.count(k)
            with log_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if progress is not None:
                progress(row)
        if epoch % checkpoint_every == 0 or epoch == epochs:
            det.save_checkpoint(out / f"epoch_{epoch:03d}.safetensors")
        det.save_checkpoint(out / "last.safetensors")
        buf = _state_bytes(optimizer)
        atomic_write_bytes(out / "optimizer.pt", buf)
        atomic_write_text(state_file, json.dumps({"epoch": epoch, "epochs": epochs, "seed": seed}))
    final = out / "metauas.safetensors"
    shutil.copyfile(out / "last.safetensors", final)
    net.eval()
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in _read_log(log_file, epochs):
        per_epoch[int(r["epoch"])].append(float(r["loss"]))
    return TrainResult(
        checkpoint=final,
        epochs=max(per_epoch, default=start),
        epoch_losses=[float(np.mean(per_epoch[e])) for e in sorted(per_epoch)],
        resumed_from=start,
    )


def _state_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    return buf.getvalue()
