"""Throughput of AdaptCLIP ``predict``: zero-shot and 1-shot, batch 1 and 8, fp32 and bf16.

For every (precision, shots, batch size) the detector is fitted (``fit(None)`` or one synthetic
normal image), one warm-up batch is run, then ``predict`` is timed over ``--n-images`` synthetic
images, one call per batch. Timings include the CPU preprocessing (PIL resize, normalisation)
and the copy of the outputs to the host, i.e. what a user of ``predict`` sees. The adapters are
untrained (speed does not depend on their values) and run in fp32; ``--precision`` is the
backbone's. For each shots setting the script also prints the largest absolute difference of
the final (smoothed, fused) anomaly maps between bf16 and fp32 on the same images.

Usage:
    python benchmarks/adaptclip_speed.py                       # tiny CLIP at 64 px, CPU, 1 thread
    python benchmarks/adaptclip_speed.py --device cuda --backbone adaptclip-vitl14-336@518 \
        --random-weights --n-images 32                         # ViT-L/14@518 architecture, no download

One flat JSON row per run is printed, then a summary table.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from anomalens.backbones.clip import ClipBackbone
from anomalens.backbones.clip_presets import get_clip_preset
from anomalens.detectors.adaptclip import AdaptCLIP


def synthetic_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n smooth random RGB images, uint8 (size, size, 3)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=gen)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")
    return [(im.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for im in up]


def build_backbone(
    preset_name: str, random_weights: bool, precision: str, device: str
) -> ClipBackbone:
    """The preset's architecture at its image size, with its weights or seeded random ones."""
    preset = get_clip_preset(preset_name)
    if random_weights or preset.pretrained is None:
        return ClipBackbone.create(
            preset.model_name,
            pretrained=None,
            image_size=preset.image_size,
            force_quick_gelu=preset.quick_gelu,
            precision=precision,  # type: ignore[arg-type]
            device=device,
            seed=0,
            mean=preset.mean,
            std=preset.std,
            interpolation=preset.interpolation,
        )
    return ClipBackbone.from_preset(preset, precision=precision, device=device)  # type: ignore[arg-type]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_predict(
    det: AdaptCLIP, images: Sequence[np.ndarray], batch_size: int
) -> tuple[float, torch.Tensor]:
    """Seconds to ``predict`` all images in batches (after one warm-up batch) and the maps.

    Returns:
        (seconds, anomaly maps (N, S, S) float32 on the CPU).
    """
    det.batch_size = batch_size
    det.predict(list(images[:batch_size]))  # warm-up (kernels, caches)
    _sync(det.device)
    maps = []
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        maps.append(det.predict(list(images[i : i + batch_size])).anomaly_map)
    _sync(det.device)
    return time.perf_counter() - start, torch.cat(maps)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All timed rows plus one ``max_abs_diff`` row per shots setting."""
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    maps: dict[tuple[str, int], torch.Tensor] = {}
    for precision in args.precisions:
        backbone = build_backbone(args.backbone, args.random_weights, precision, args.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="AdaptCLIP adapters are untrained")
            det = AdaptCLIP(backbone, device=args.device, seed=0, untrained=True)
        size = det.image_size
        images = synthetic_images(args.n_images, size, seed=1)
        prompt = synthetic_images(1, size, seed=2)
        for shots in args.shots:
            det.fit(prompt if shots else None)
            for bs in args.batch_sizes:
                seconds, out = time_predict(det, images, bs)
                maps.setdefault((precision, shots), out)
                row = {
                    "backbone": args.backbone,
                    "weights": "random" if args.random_weights else "preset",
                    "device": args.device,
                    "image_size": size,
                    "precision": precision,
                    "shots": shots,
                    "batch_size": bs,
                    "n_images": len(images),
                    "images_per_s": round(len(images) / seconds, 2),
                    "ms_per_image": round(1000 * seconds / len(images), 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        del det, backbone
    if "fp32" in args.precisions:
        for (precision, shots), m in sorted(maps.items()):
            if precision == "fp32":
                continue
            diff = (m - maps[("fp32", shots)]).abs().max().item()
            row = {"compare": f"{precision} vs fp32", "shots": shots, "max_abs_diff_map": diff}
            ref = maps[("fp32", shots)]
            row["fp32_map_range"] = [round(float(ref.min()), 4), round(float(ref.max()), 4)]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| precision | shots | batch | images/s | ms/image |", "|---|---|---|---|---|"]
    for r in rows:
        if "images_per_s" in r:
            lines.append(
                f"| {r['precision']} | {r['shots']} | {r['batch_size']} | "
                f"{r['images_per_s']:.2f} | {r['ms_per_image']:.1f} |"
            )
    for r in rows:
        if "compare" in r:
            lines.append(
                f"\n{r['compare']}, {r['shots']}-shot: max |diff| of the maps = "
                f"{r['max_abs_diff_map']:.3g} (fp32 range {r['fp32_map_range']})"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="anomalens-tiny-clip@64", help="CLIP preset name")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="build the preset's architecture with seeded random weights (no download)",
    )
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--shots", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    p.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"]
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.n_images < max(args.batch_sizes):
        p.error("--n-images must be at least the largest batch size")
    rows = run(args)
    print(_table(rows))


if __name__ == "__main__":
    main()
