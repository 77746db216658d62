"""Speed and memory of the category-level pixel metrics, exact vs binned.

Feeds N synthetic anomaly maps of SIZE x SIZE (default: 1725 maps at 518 x 518, the size of
the MVTec AD test set at the usual zero-shot resolution) in batches to
``PixelMetricAccumulator`` and prints, per mode, the seconds spent in ``update`` +
``compute`` (map generation excluded; wall and process CPU time, the latter being the
better figure on a shared machine), the tracemalloc peak of the pass, and the largest
absolute difference of the binned metrics from the exact ones.

Maps are generated on the fly from a per-batch seed, so both passes see identical data and
the script never holds more than one batch of maps (only the exact accumulator's compact
store grows). Maps: smooth low-frequency background + fine noise; ~70% of the images carry
1-3 elliptic defects whose pixels get a raised, blob-shaped score.

Usage:
    python benchmarks/metrics_speed.py                 # full size (needs ~4 GB for exact)
    python benchmarks/metrics_speed.py --n 64 --size 256
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import tracemalloc
from collections.abc import Iterator

import numpy as np

from anomalens.metrics import PixelMetricAccumulator


def _interp_matrix(size: int, low: int) -> np.ndarray:
    """(size, low) linear-interpolation matrix from a low-res grid to ``size`` samples."""
    pos = np.linspace(0, low - 1, size)
    left = np.clip(np.floor(pos).astype(int), 0, low - 2)
    frac = pos - left
    mat = np.zeros((size, low), dtype=np.float32)
    mat[np.arange(size), left] = 1 - frac
    mat[np.arange(size), left + 1] = frac
    return mat


def synthetic_batch(
    seed: int, batch: int, size: int, anomalous_fraction: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of realistic-looking maps and masks.

    Returns:
        maps (B, S, S) float32 and masks (B, S, S) bool.
    """
    rng = np.random.default_rng(seed)
    low = max(4, size // 32)
    interp = _interp_matrix(size, low)
    coarse = rng.random((batch, low, low), dtype=np.float32)
    maps = interp @ coarse @ interp.T  # smooth background in [0, 1]
    maps += 0.05 * rng.random((batch, size, size), dtype=np.float32)
    masks = np.zeros((batch, size, size), dtype=bool)
    for i in range(batch):
        if rng.random() > anomalous_fraction:
            continue
        for _ in range(int(rng.integers(1, 4))):
            ry, rx = rng.uniform(0.02, 0.13, 2) * size
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            y0, y1 = int(max(0, cy - 1.3 * ry)), int(min(size, cy + 1.3 * ry + 1))
            x0, x1 = int(max(0, cx - 1.3 * rx)), int(min(size, cx + 1.3 * rx + 1))
            yy, xx = np.mgrid[y0:y1, x0:x1]
            d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            bump = rng.uniform(0.2, 1.0) * np.clip(1.0 - d2 / 1.69, 0.0, None)
            maps[i, y0:y1, x0:x1] += bump.astype(np.float32)
            masks[i, y0:y1, x0:x1] |= d2 <= 1.0
    return maps, masks


def batches(n: int, size: int, batch: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``ceil(n / batch)`` seeded batches totalling n maps."""
    for k, start in enumerate(range(0, n, batch)):
        yield synthetic_batch(seed * 100_003 + k, min(batch, n - start), size)


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, object]:
    """Feed every batch to one accumulator; time update + compute only."""
    tracemalloc.start()
    acc = PixelMetricAccumulator(mode, num_bins=args.bins)  # type: ignore[arg-type]
    t_update = t_gen = cpu = 0.0
    anomalous = total = 0
    t0 = time.perf_counter()
    for maps, masks in batches(args.n, args.size, args.batch, args.seed):
        t1 = time.perf_counter()
        t_gen += t1 - t0
        c0 = time.process_time()
        acc.update(maps, masks)
        cpu += time.process_time() - c0
        anomalous += int(masks.sum())
        total += masks.size
        t0 = time.perf_counter()
        t_update += t0 - t1
    store = acc.nbytes
    t1, c0 = time.perf_counter(), time.process_time()
    metrics = acc.compute()
    t_compute = time.perf_counter() - t1
    cpu += time.process_time() - c0
    bounds = acc.error_bounds()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "mode": mode,
        "seconds": t_update + t_compute,
        "cpu_s": cpu,
        "update_s": t_update,
        "compute_s": t_compute,
        "generate_s": t_gen,
        "store_mb": store / 2**20,
        "peak_mb": peak / 2**20,
        "anomalous_pixel_fraction": anomalous / max(total, 1),
        "regions": acc.num_regions,
        "metrics": metrics,
        "bounds": bounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1725, help="number of maps (default 1725)")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels (default 518)")
    parser.add_argument("--batch", type=int, default=32, help="maps per update (default 32)")
    parser.add_argument("--bins", type=int, default=1 << 20, help="binned-mode bins (2**20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--modes", nargs="+", default=["binned", "exact"], choices=["binned", "exact"]
    )
    args = parser.parse_args()

    pixels = args.n * args.size * args.size
    print(
        f"{args.n} maps of {args.size}x{args.size} = {pixels / 1e6:.1f} M pixels, batch {args.batch}"
    )
    results = {mode: run_mode(mode, args) for mode in args.modes}
    for r in results.values():
        print(
            f"{r['mode']:>6}: {r['seconds']:7.2f} s wall, {r['cpu_s']:.2f} s CPU (update {r['update_s']:.2f} s, compute "
            f"{r['compute_s']:.2f} s; generation {r['generate_s']:.2f} s not counted), store "
            f"{r['store_mb']:.0f} MiB, tracemalloc peak {r['peak_mb']:.0f} MiB"
        )
        print("        " + ", ".join(f"{k}={v:.6f}" for k, v in r["metrics"].items()))
    row: dict[str, object] = {
        "n": args.n,
        "size": args.size,
        "batch": args.batch,
        "bins": args.bins,
        "anomalous_pixel_fraction": next(iter(results.values()))["anomalous_pixel_fraction"],
        "regions": next(iter(results.values()))["regions"],
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    for mode, r in results.items():
        row[f"{mode}_s"] = round(float(r["seconds"]), 3)  # type: ignore[arg-type]
        row[f"{mode}_cpu_s"] = round(float(r["cpu_s"]), 3)  # type: ignore[arg-type]
        row[f"{mode}_peak_mb"] = round(float(r["peak_mb"]), 1)  # type: ignore[arg-type]
    if {"binned", "exact"} <= results.keys():
        exact, binned = results["exact"]["metrics"], results["binned"]["metrics"]
        err = max(abs(binned[k] - exact[k]) for k in exact)  # type: ignore[index]
        row["binned_max_abs_error"] = err
        print(f"binned vs exact: largest absolute error over the four metrics = {err:.2e}")
    if "binned" in results:
        bound = max(results["binned"]["bounds"].values())  # type: ignore[union-attr]
        row["binned_error_bound"] = bound
        print(f"binned guaranteed error bound (largest over the four metrics) = {bound:.2e}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
