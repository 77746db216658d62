"""Images per second of the CLIP backbone (AdaptCLIP-style forward: 4 taps + V-V path).

Examples::

    # quick CPU run on the tiny random CLIP (default)
    python benchmarks/clip_speed.py

    # ViT-L/14@336 at 518 px, random weights (no download), on a GPU, fp16
    python benchmarks/clip_speed.py --device cuda --model ViT-L-14-336 --image-size 518 \\
        --random-weights --precision fp16

Prints one row per (batch size, mode): mode ``vv`` = ``encode_image(layers, vv_start)`` (AdaptCLIP /
AnomalyCLIP), ``plain`` = plain CLIP taps (MuSc / WinCLIP).
"""

from __future__ import annotations

import argparse
import time

import torch

from anomalens.backbones.clip import ClipBackbone
from anomalens.backbones.tiny import TINY_CLIP_NAME, make_tiny_clip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    bb: ClipBackbone,
    batch: int,
    layers: tuple[int, ...],
    vv_start: int | None,
    warmup: int,
    iters: int,
    min_seconds: float,
) -> float:
    """Images per second of ``encode_image`` on random inputs of the backbone's size."""
    s = bb.image_size
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0)).to(bb.device)
    for _ in range(warmup):
        bb.encode_image(x, layers=layers, vv_start=vv_start)
    _sync(bb.device)
    n, t0 = 0, time.perf_counter()
    while n < iters or time.perf_counter() - t0 < min_seconds:
        bb.encode_image(x, layers=layers, vv_start=vv_start)
        n += 1
        if n >= 10 * iters:
            break
    _sync(bb.device)
    return n * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, build the backbone, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=TINY_CLIP_NAME, help="open_clip model name")
    ap.add_argument(
        "--pretrained", default="openai", help="tag / file (ignored with --random-weights)"
    )
    ap.add_argument("--image-size", type=int, default=None, help="input side (default: native)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", action="store_true", help="no weight file (seeded init)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: 4 evenly spaced")
    ap.add_argument("--vv-start", type=int, default=None, help="default: 6 for 24 blocks, 4 for 12")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == TINY_CLIP_NAME:
        bb = make_tiny_clip(0, args.image_size, args.precision, args.device)
        weights = "random (tiny)"
    else:
        pretrained = None if args.random_weights else args.pretrained
        bb = ClipBackbone.create(
            args.model,
            pretrained=pretrained,
            image_size=args.image_size,
            precision=args.precision,
            device=args.device,
            seed=0,
        )
        weights = pretrained or "random"
    n = bb.num_layers
    layers = tuple(args.layers) if args.layers else tuple(n * k // 4 for k in (1, 2, 3, 4))
    # AdaptCLIP / AnomalyCLIP: ViT-L (24 blocks) from block 6, ViT-B (12 blocks) from block 4
    vv_start = args.vv_start if args.vv_start is not None else {24: 6, 12: 4}.get(n, n // 4 + 1)
    dev = torch.cuda.get_device_name(bb.device) if bb.device.type == "cuda" else "cpu"
    print(
        f"model={args.model} weights={weights} image_size={bb.image_size} grid={bb.grid_size} "
        f"precision={args.precision} device={dev} threads={torch.get_num_threads()} "
        f"layers={layers} vv_start={vv_start}"
    )
    print(f"| {'batch':>5} | {'mode':<5} | {'images/s':>10} | {'ms/image':>9} |")
    print(f"|{'-' * 7}|{'-' * 7}|{'-' * 12}|{'-' * 11}|")
    for batch in args.batch_sizes:
        for mode, start in (("vv", vv_start), ("plain", None)):
            ips = measure(bb, batch, layers, start, args.warmup, args.iters, args.min_seconds)
            print(f"| {batch:>5} | {mode:<5} | {ips:>10.2f} | {1000 / ips:>9.2f} |")
    if bb.device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(bb.device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
