"""Speed and memory of the category-level pixel metrics: product exact and binned vs peers.

Feeds N synthetic anomaly maps of SIZE x SIZE (default: 1725 maps at 518 x 518, the size of
the MVTec AD test set at the usual zero-shot resolution) in batches to
``PixelMetricAccumulator`` and prints, per mode, the seconds spent in ``update`` +
``compute`` (map generation excluded; wall and process CPU time, the latter being the
better figure on a shared machine), the tracemalloc peak of the pass, and the largest
absolute difference of the binned metrics from the exact ones. Modes: ``exact`` (the
default bucket engine: numba kernels on every core, see ``ANOMALENS_METRIC_THREADS``),
``exact1`` (the same on one thread), ``numpy`` (the bucket engine's numpy fallback, used
without numba), ``binned``, and ``sort`` (the former sort-based exact path, kept as the
reference; slow where numpy's sort kernel is slow). Peak memory is reported twice: the
tracemalloc peak (numpy's allocations only) and the peak resident-set growth during the pass
(sampled every 5 ms; includes memory the compiled kernels allocate). The JIT warm-up (numba
compiling the kernels, or loading them from its disk cache) is timed separately, before any
pass.

Then, on a subset of ``--peer-n`` maps that fits in memory as one array, it times the peers
that are installed: scikit-learn's ``roc_auc_score`` + ``average_precision_score``,
torchmetrics' exact ``binary_auroc`` + ``binary_average_precision``, anomalib's ``AUPRO``,
and the product's own exact and sort paths on the same maps (all values printed), and
prints seconds per map and the ratio of each peer's seconds per map to the product's
full-size exact run. The header names the CPU and the sort kernel numpy dispatches to.

Maps are generated on the fly from a per-batch seed, so every pass sees identical data and
the script never holds more than one batch of maps (only the exact accumulator's compact
store grows). Maps: smooth low-frequency background + fine noise; ~70% of the images carry
1-3 elliptic defects whose pixels get a raised, blob-shaped score.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/metrics_speed.py          # full size (~3 GB peak)
    python benchmarks/metrics_speed.py --n 64 --size 256 --peer-n 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator

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


class RssPeak:
    """Peak growth of the resident set size over its value at start (sampled, Linux)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def stop(self) -> float:
        """Stop sampling; the peak growth in bytes."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        return float(self.peak - self.base)


def _rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _accumulator(mode: str, args: argparse.Namespace) -> PixelMetricAccumulator:
    if mode == "sort":
        return PixelMetricAccumulator("exact", exact_method="sort")
    if mode in ("exact", "exact1", "numpy"):
        acc = PixelMetricAccumulator("exact")
        if mode == "exact1":
            os.environ["ANOMALENS_METRIC_THREADS"] = "1"  # read when the store is created
            acc.reset()
            del os.environ["ANOMALENS_METRIC_THREADS"]
        elif mode == "numpy":
            from anomalens.metrics._buckets import BucketStore

            acc._buckets = BucketStore()
        return acc
    return PixelMetricAccumulator(mode, num_bins=args.bins)  # type: ignore[arg-type]


def kernel_warmup() -> str:
    """Compile (or load from numba's disk cache) the exact kernels; say what ran."""
    from anomalens.metrics import _kernels

    t0 = time.perf_counter()
    acc = PixelMetricAccumulator("exact")
    rng = np.random.default_rng(0)
    maps = rng.random((2, 32, 32), dtype=np.float32)
    acc.update(maps, maps > 0.9)
    acc.compute()
    seconds = time.perf_counter() - t0
    kernels = _kernels.compiled()
    if kernels is None:
        return "numba not available: the exact mode runs the numpy store"
    return (
        f"numba {kernels.numba.__version__}, {_kernels.threads()} threads; "
        f"kernels ready in {seconds:.2f} s (first run on a machine compiles, later runs load "
        f"numba's disk cache)"
    )


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, object]:
    """Feed every batch to one accumulator; time update + compute only."""
    rss = RssPeak()
    tracemalloc.start()
    acc = _accumulator(mode, args)
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
    cpu_compute = time.process_time() - c0
    cpu += cpu_compute
    bounds = acc.error_bounds()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_peak = rss.stop()
    return {
        "mode": mode,
        "seconds": t_update + t_compute,
        "cpu_s": cpu,
        "compute_cpu_s": cpu_compute,
        "update_s": t_update,
        "compute_s": t_compute,
        "generate_s": t_gen,
        "store_mb": store / 2**20,
        "peak_mb": peak / 2**20,
        "rss_peak_mb": rss_peak / 2**20,
        "anomalous_pixel_fraction": anomalous / max(total, 1),
        "regions": acc.num_regions,
        "metrics": metrics,
        "bounds": bounds,
    }


def cpu_description() -> str:
    """CPU model (with family / model numbers, which identify e.g. AMD Zen 4) and cores."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    name = fields.get("model name", platform.processor())
    fam = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    return f"{name} ({fields.get('vendor_id', '?')} {fam}), {os.cpu_count()} logical cores"


def numpy_sort_kernel() -> str:
    """The SIMD target numpy's np.sort dispatches to, and its measured speed."""
    core = getattr(np, "_core", None)
    umath = getattr(core, "_multiarray_umath", None)
    features = getattr(umath, "__cpu_features__", {})
    dispatch = getattr(umath, "__cpu_dispatch__", [])
    active = [t for t in dispatch if features.get(t)]
    avx512 = [t for t in active if "AVX512" in t or t == "X86_V4"]
    if avx512:
        kernel = f"x86-simd-sort AVX-512 ({avx512[-1]})"
    elif features.get("AVX2"):
        kernel = "x86-simd-sort AVX2 (X86_V3)"
    else:
        kernel = "generic introsort"
    disabled = os.environ.get("NPY_DISABLE_CPU_FEATURES")
    if disabled:
        kernel += f"; NPY_DISABLE_CPU_FEATURES={disabled}"
    x = np.random.default_rng(0).random(1 << 23, dtype=np.float32)
    c0 = time.process_time()
    np.sort(x)
    ns = (time.process_time() - c0) * 1e9 / x.size
    return f"numpy {np.__version__}, np.sort -> {kernel}: {ns:.1f} ns per float32 (8 M)"


def _timed(fn: Callable[[], dict[str, float]]) -> tuple[float, float, dict[str, float]]:
    """Wall and process-CPU seconds of fn() and its result."""
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def peer_runs(maps: np.ndarray, masks: np.ndarray) -> dict[str, tuple[float, float, dict]]:
    """Time the product and every installed peer on the same in-memory maps."""
    from anomalens.metrics import pixel_metrics

    runs: dict[str, tuple[float, float, dict]] = {}
    runs["anomalens exact"] = _timed(lambda: pixel_metrics(maps, masks))
    runs["anomalens sort path"] = _timed(lambda: pixel_metrics(maps, masks, exact_method="sort"))
    if importlib.util.find_spec("sklearn"):
        from sklearn.metrics import average_precision_score, roc_auc_score

        def sk() -> dict[str, float]:
            s, y = maps.reshape(-1), masks.reshape(-1)
            return {"pixel_auroc": roc_auc_score(y, s), "pixel_ap": average_precision_score(y, s)}

        runs["scikit-learn AUROC+AP"] = _timed(sk)
    torch_spec = importlib.util.find_spec("torch")
    if torch_spec and importlib.util.find_spec("torchmetrics"):
        import torch
        from torchmetrics.functional.classification import (
            binary_auroc,
            binary_average_precision,
        )

        def tm() -> dict[str, float]:
            s, y = torch.from_numpy(maps.reshape(-1)), torch.from_numpy(masks.reshape(-1))
            return {
                "pixel_auroc": float(binary_auroc(s, y.long())),
                "pixel_ap": float(binary_average_precision(s, y.long())),
            }

        runs["torchmetrics AUROC+AP"] = _timed(tm)
    if torch_spec and importlib.util.find_spec("anomalib"):
        import torch

        # The plain torchmetrics metric behind anomalib's batch-field wrapper ``AUPRO``.
        from anomalib.metrics.aupro import _AUPRO

        def ab() -> dict[str, float]:
            metric = _AUPRO(fpr_limit=0.3)
            metric.update(torch.from_numpy(maps), torch.from_numpy(masks).int())
            return {"pixel_aupro": float(metric.compute())}

        runs["anomalib AUPRO"] = _timed(ab)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1725, help="number of maps (default 1725)")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels (default 518)")
    parser.add_argument("--batch", type=int, default=32, help="maps per update (default 32)")
    parser.add_argument("--bins", type=int, default=1 << 20, help="binned-mode bins (2**20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["binned", "exact"],
        choices=["binned", "exact", "exact1", "numpy", "sort"],
        help="full-size passes (exact1 = exact on one thread, numpy = the fallback without "
        "numba, sort = the former sort-based exact path)",
    )
    parser.add_argument(
        "--peer-n", type=int, default=100, help="maps in the peer comparison (0: none)"
    )
    args = parser.parse_args()
    if importlib.util.find_spec("torch"):
        import torch

        torch.set_num_threads(1)  # every contender on one thread

    pixels = args.n * args.size * args.size
    print(f"CPU: {cpu_description()}")
    print(f"sort kernel: {numpy_sort_kernel()}")
    print(f"exact kernels: {kernel_warmup()}")
    print(
        f"{args.n} maps of {args.size}x{args.size} = {pixels / 1e6:.1f} M pixels, batch {args.batch}"
    )
    results = {mode: run_mode(mode, args) for mode in args.modes}
    for r in results.values():
        print(
            f"{r['mode']:>6}: {r['seconds']:7.2f} s wall, {r['cpu_s']:.2f} s CPU ({r['compute_cpu_s']:.2f} in compute; wall: update {r['update_s']:.2f} s, compute "
            f"{r['compute_s']:.2f} s; generation {r['generate_s']:.2f} s not counted), store "
            f"{r['store_mb']:.0f} MiB, tracemalloc peak {r['peak_mb']:.0f} MiB, RSS growth "
            f"{r['rss_peak_mb']:.0f} MiB"
        )
        print("        " + ", ".join(f"{k}={v:.6f}" for k, v in r["metrics"].items()))
    row: dict[str, object] = {
        "n": args.n,
        "size": args.size,
        "batch": args.batch,
        "bins": args.bins,
        "anomalous_pixel_fraction": next(iter(results.values()))["anomalous_pixel_fraction"],
        "regions": next(iter(results.values()))["regions"],
    }
    for mode, r in results.items():
        row[f"{mode}_s"] = round(float(r["seconds"]), 3)  # type: ignore[arg-type]
        row[f"{mode}_cpu_s"] = round(float(r["cpu_s"]), 3)  # type: ignore[arg-type]
        row[f"{mode}_peak_mb"] = round(float(r["peak_mb"]), 1)  # type: ignore[arg-type]
        row[f"{mode}_rss_peak_mb"] = round(float(r["rss_peak_mb"]), 1)  # type: ignore[arg-type]
    exact_key = "exact" if "exact" in results else "sort" if "sort" in results else None
    if exact_key and "binned" in results:
        exact, binned = results[exact_key]["metrics"], results["binned"]["metrics"]
        err = max(abs(binned[k] - exact[k]) for k in exact)  # type: ignore[index]
        row["binned_max_abs_error"] = err
        print(f"binned vs exact: largest absolute error over the four metrics = {err:.2e}")
    if {"exact", "sort"} <= results.keys():
        a, b = results["exact"]["metrics"], results["sort"]["metrics"]
        diff = max(abs(a[k] - b[k]) for k in a)  # type: ignore[index]
        row["exact_vs_sort_max_abs_diff"] = diff
        print(f"exact vs sort path: largest absolute difference = {diff:.1e}")
    if "binned" in results:
        bound = max(results["binned"]["bounds"].values())  # type: ignore[union-attr]
        row["binned_error_bound"] = bound
        print(f"binned guaranteed error bound (largest over the four metrics) = {bound:.2e}")

    if args.peer_n > 0:
        n_sub = min(args.peer_n, args.n)
        parts = list(batches(n_sub, args.size, args.batch, args.seed))
        maps = np.concatenate([m for m, _ in parts])
        masks = np.concatenate([k for _, k in parts])
        del parts
        ref = results[exact_key]["cpu_s"] / args.n if exact_key else None  # type: ignore[operator]
        ref_wall = results[exact_key]["seconds"] / args.n if exact_key else None  # type: ignore[operator]
        print(
            f"peers on the first {n_sub} maps ({maps.size / 1e6:.1f} M pixels, one array); "
            f"ratios = peer s/map over the full-size {exact_key} run's s/map, by CPU time "
            f"(work) and by wall time (the peers run on one thread)"
        )
        runs = peer_runs(maps, masks)
        stack = ("torchmetrics AUROC+AP", "anomalib AUPRO")
        if all(k in runs for k in stack):
            runs["peer stack: torchmetrics + anomalib"] = (
                sum(runs[k][0] for k in stack),
                sum(runs[k][1] for k in stack),
                {},
            )
        for name, (wall, cpu, out) in runs.items():
            per_map = cpu / n_sub
            ratio = f"{per_map / ref:8.1f}x CPU" if ref else "     n/a"
            if ref_wall:
                ratio += f" {wall / n_sub / ref_wall:8.1f}x wall"
            values = ", ".join(f"{k}={float(v):.6f}" for k, v in out.items())
            print(
                f"  {name:<36} {wall:7.2f} s wall {cpu:7.2f} s CPU {per_map * 1e3:8.1f} ms CPU/map "
                f"{ratio}  {values}"
            )
            key = "".join(c if c.isalnum() else "_" for c in name.lower())
            row[f"peer_{key}_cpu_ms_per_map"] = round(per_map * 1e3, 2)
            row[f"peer_{key}_wall_ms_per_map"] = round(wall / n_sub * 1e3, 2)
        row["peer_n"] = n_sub
    row["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(row))


if __name__ == "__main__":
    main()
