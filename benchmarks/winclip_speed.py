"""Throughput of WinCLIP (zero-shot) and WinCLIP+ (k-shot) ``predict``.

For every (shots, batch size) pair the script builds the detector, fits it (``fit(None)`` or
k synthetic normal images), runs one warm-up batch, then times ``predict`` over N images and
prints one flat JSON row per run: images/s and ms/image. Text prototypes are computed in ``fit``
and are not timed. Speed does not depend on the weight values, so ``--pretrained none``
measures a real architecture with random weights (offline).

Usage:
    python benchmarks/winclip_speed.py                                  # tiny CLIP, CPU, 1 thread
    python benchmarks/winclip_speed.py --model ViT-B-16-plus-240 --pretrained none \
        --image-size 240 --n-images 16 --batch-sizes 1 8
    python benchmarks/winclip_speed.py --device cuda --model ViT-B-16-plus-240 --pretrained none
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np
import torch

from anomalens.backbones.clip import ClipBackbone
from anomalens.backbones.tiny import TINY_CLIP_NAME
from anomalens.detectors.winclip import WinCLIP


def synthetic_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n smooth random RGB images, uint8 (size, size, 3)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=gen)
    up = torch.nn.functional.interpolate(
        low, size=(size, size), mode="bilinear", align_corners=False
    )
    return [(im.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for im in up]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_winclip(
    backbone: ClipBackbone,
    shots: int = 0,
    batch_size: int = 1,
    n_images: int = 16,
    seed: int = 0,
) -> dict[str, object]:
    """Time ``WinCLIP.predict`` on synthetic images.

    Args:
        backbone: CLIP backbone (any size / device).
        shots: number of normal reference images (0: zero-shot WinCLIP).
        batch_size: images per ``predict`` call (and per backbone forward).
        n_images: images timed (rounded up to whole batches).
        seed: seed of the synthetic images.

    Returns:
        One flat row: model, image size, device, shots, batch size, images, seconds,
        images/s and ms/image.
    """
    size = backbone.image_size
    det = WinCLIP(backbone, batch_size=batch_size)
    det.fit(synthetic_images(shots, size, seed + 1) if shots else None)
    n_batches = max(1, -(-n_images // batch_size))
    images = synthetic_images(n_batches * batch_size, size, seed)
    det.predict(images[:batch_size])  # warm-up
    _sync(backbone.device)
    start = time.perf_counter()
    for i in range(n_batches):
        det.predict(images[i * batch_size : (i + 1) * batch_size])
    _sync(backbone.device)
    seconds = time.perf_counter() - start
    n = n_batches * batch_size
    return {
        "method": "winclip" if shots == 0 else "winclip+",
        "model": backbone.model_name,
        "image_size": size,
        "device": str(backbone.device),
        "threads": torch.get_num_threads(),
        "shots": shots,
        "batch_size": batch_size,
        "images": n,
        "seconds": round(seconds, 4),
        "images_per_s": round(n / seconds, 2),
        "ms_per_image": round(1000 * seconds / n, 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY_CLIP_NAME, help="open_clip model name")
    parser.add_argument("--pretrained", default="none", help="tag / file, or 'none' (random)")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: native)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--n-images", type=int, default=16)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    backbone = ClipBackbone.create(
        args.model,
        pretrained=None if args.pretrained.lower() == "none" else args.pretrained,
        image_size=args.image_size,
        precision=args.precision,
        device=args.device,
    )
    for shots in args.shots:
        for batch_size in args.batch_sizes:
            row = benchmark_winclip(backbone, shots, batch_size, args.n_images)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
