"""Throughput of MetaUAS: images/s at 256 and 512 px, batch 1 and 16, fp32 and bf16.

Two modes, both timed from uint8 arrays to maps on the host (preprocessing included):

* ``predict``: ``fit`` on one normal image (its features are kept), then ``predict`` on the
  queries: one encoder pass per query;
* ``pairs``: ``predict_pairs(queries, references)``: two encoder passes per pair (what
  reference-based inspection costs).

Random weights by default (speed does not depend on their values; the official checkpoints have
the same architecture); ``--checkpoint`` loads a file instead, which makes the bf16 difference
meaningful (an untrained network outputs nearly constant maps), e.g. the parity fixture's
``metauas_official.ckpt`` (random but calibrated weights). One warm-up call per setting, then the images are scored in ``--batch-sizes``
chunks. For each size and mode the script also prints the largest |difference| of the maps
bf16 vs fp32 on the same images.

Usage:
    python benchmarks/metauas_speed.py                       # CPU, 2 threads, 16 images
    python benchmarks/metauas_speed.py --device cuda --n-images 512 --batch-sizes 1 16 64 128

One flat JSON row per run is printed, then a summary table.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import numpy as np
import torch

from anomalens.detectors.metauas import MetaUAS


def synthetic_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """n smooth random RGB images, uint8 (size, size, 3)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=gen)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")
    return [(im.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for im in up]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mode(
    det: MetaUAS, mode: str, queries: list[np.ndarray], refs: list[np.ndarray], batch: int
) -> tuple[float, torch.Tensor]:
    """Seconds to score every query (after one warm-up batch), and the maps (N, S, S)."""

    def call(lo: int, hi: int) -> torch.Tensor:
        if mode == "pairs":
            return det.predict_pairs(queries[lo:hi], refs[lo:hi]).anomaly_map
        return det.predict(queries[lo:hi]).anomaly_map

    det.batch_size = batch
    call(0, batch)
    _sync(det.device)
    start = time.perf_counter()
    maps = [call(i, i + batch) for i in range(0, len(queries), batch)]
    _sync(det.device)
    return time.perf_counter() - start, torch.cat(maps)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        queries = synthetic_images(args.n_images, size, seed=1)
        refs = synthetic_images(args.n_images, size, seed=2)
        maps: dict[tuple[str, str], torch.Tensor] = {}
        for precision in args.precisions:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="MetaUAS has random weights")
                det = MetaUAS(
                    args.checkpoint,
                    image_size=size,
                    precision=precision,
                    device=args.device,
                    seed=0,
                )
            det.fit(refs[:1])
            for mode in args.modes:
                for bs in args.batch_sizes:
                    seconds, out = time_mode(det, mode, queries, refs, bs)
                    maps.setdefault((precision, mode), out)
                    row = {
                        "device": args.device,
                        "weights": "random" if args.checkpoint is None else "checkpoint",
                        "threads": args.threads if args.device == "cpu" else None,
                        "image_size": size,
                        "precision": precision,
                        "mode": mode,
                        "batch_size": bs,
                        "n_images": len(queries),
                        "images_per_s": round(len(queries) / seconds, 2),
                        "ms_per_image": round(1000 * seconds / len(queries), 2),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        for mode in args.modes:
            if ("fp32", mode) in maps and ("bf16", mode) in maps:
                diff = (maps[("fp32", mode)] - maps[("bf16", mode)]).abs().max().item()
                row = {"image_size": size, "mode": mode, "bf16_vs_fp32_max_abs_diff": diff}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=["predict", "pairs"], choices=["predict", "pairs"])
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--checkpoint", help="MetaUAS weights (default: random)")
    args = p.parse_args()
    rows = run(args)
    print("\n| size | precision | mode | batch | images/s | ms/image |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "images_per_s" in r:
            print(
                f"| {r['image_size']} | {r['precision']} | {r['mode']} | {r['batch_size']} | "
                f"{r['images_per_s']} | {r['ms_per_image']} |"
            )
    for r in rows:
        if "bf16_vs_fp32_max_abs_diff" in r:
            print(
                f"bf16 vs fp32 max |map difference| at {r['image_size']} ({r['mode']}): "
                f"{r['bf16_vs_fp32_max_abs_diff']:.4g}"
            )


if __name__ == "__main__":
    main()
