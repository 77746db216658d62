"""Time and peak memory of MuSc's *scoring stage* as the number of test images N grows.

What is measured: ``MuSc.score_features`` (LNAMD for every (layer, r), MSM mutual scoring with
the streamed query x reference blocks, fusion, float64 upsampling to S x S, max) followed by
RsCIN, on random patch tokens of the right shape: N images x L = (S / patch)^2 tokens x C
channels x ``--layers`` layers. The backbone is *not* run (its cost is linear in N and is
measured by ``benchmarks/clip_speed.py``); MSM is the part that grows with N^2.

Every N runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its
own. Reported per row: ``seconds`` (scoring + RsCIN), ``peak_rss_mb`` (whole process, includes
the features and the (N, S, S) float32 output maps; ``baseline_rss_mb`` = after the imports), ``features_mb`` (the stored tokens),
``maps_mb`` (the output), ``msm_block_mb`` (one (chunk * L, chunk * L) distance block plus one
(chunk, L, N) NN-distance matrix: the streaming working set), ``cuda_peak_mb`` on CUDA.

Default = the paper setting (ViT-L-14-336 at 518 px: L = 37 x 37 = 1369, C = 1024, 4 layers,
r = 1, 3, 5). On a CPU that takes hours for N = 200; run it small, e.g.:

    python benchmarks/musc_scale.py --n 50 100 200 --size 112 --feature-dim 64
    python benchmarks/musc_scale.py --device cuda --n 200 1000 2000      # paper size on a GPU

``--msm-dtype bfloat16|float16`` times the half-precision neighbour search (MuSc option
``msm_dtype``). ``--sample-sets`` scores only the first (layer, r) set while all layers' tokens
are held in memory, and reports ``seconds`` = measured x (layers x len(r)): every set does the
same arithmetic (LNAMD differs only in a cheap r x r mean), so this is a linear extrapolation of
a measured part, marked ``"extrapolated": true`` in the row; the peak memory is measured as is
(the working set of one set is the working set of every set).

One flat JSON row per N is printed (and a summary table at the end).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch


def _run_one(args: argparse.Namespace) -> dict[str, Any]:
    from anomalens.detectors.musc import MuSc, PatchFeatures
    from anomalens.scoring.musc import rscin

    class _Unused:
        """Extractor placeholder: the benchmark feeds tokens to ``score_features`` directly."""

        def preprocess(self, images: Any, size: int) -> torch.Tensor:
            raise RuntimeError("not used")

        def extract(self, x: torch.Tensor) -> PatchFeatures:
            raise RuntimeError("not used")

        def describe(self) -> dict[str, Any]:
            return {"backbone": "random-features"}

    torch.set_num_threads(args.threads)
    sets = len(args.r) * args.layers
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device = torch.device(args.device)
    n, side, c = args.single, args.size // args.patch, args.feature_dim
    dtype = getattr(torch, args.feature_dtype)
    # tokens are drawn where they are used (a paper-size batch of 2000 is 45 GB in float32)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = []
    for _ in range(args.layers):
        layer = torch.empty(n, side * side, c, device=device, dtype=dtype)
        for i in range(0, n, 64):
            layer[i : i + 64] = torch.randn(
                min(64, n - i), side * side, c, generator=gen, device=device
            )
        tokens.append(layer)
    gen = torch.Generator(device="cpu").manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(n, 768, generator=gen), dim=-1)
    det = MuSc(
        backbone=_Unused(),
        image_size=args.size,
        r=args.r[:1] if args.sample_sets else args.r,
        chunk_size=args.chunk_size,
        feature_dtype=args.feature_dtype,
        msm_dtype=args.msm_dtype,
        progress=False,
        device=device,
    )
    scored = tokens[:1] if args.sample_sets else tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    maps, raw, _ = det.score_features(scored, [(side, side)] * len(scored))
    scores = rscin(raw, emb)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    measured = seconds
    if args.sample_sets:
        seconds *= sets
    assert torch.isfinite(scores).all() and maps.shape == (n, args.size, args.size)
    length = side * side
    chunk = n if args.chunk_size is None else min(args.chunk_size, n)
    row = {
        "n_images": n,
        "size": args.size,
        "tokens": length,
        "feature_dim": c,
        "layers": args.layers,
        "r": list(args.r),
        "chunk_size": args.chunk_size,
        "feature_dtype": args.feature_dtype,
        "msm_dtype": args.msm_dtype,
        "device": str(device),
        "threads": args.threads,
        "seconds": round(seconds, 3),
        "extrapolated": bool(args.sample_sets),
        "measured_seconds": round(measured, 3),
        "measured_sets": 1 if args.sample_sets else sets,
        "ms_per_image": round(1000 * seconds / n, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "baseline_rss_mb": round(baseline_mb, 1),
        "features_mb": round(sum(t.numel() * t.element_size() for t in tokens) / 2**20, 1),
        "maps_mb": round(maps.numel() * 4 / 2**20, 1),
        "msm_block_mb": round(4 * ((chunk * length) ** 2 + chunk * length * n) / 2**20, 1),
    }
    if device.type == "cuda":
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[200, 1000, 2000], help="numbers of images")
    p.add_argument("--size", type=int, default=518, help="image size S (maps are S x S)")
    p.add_argument("--patch", type=int, default=14, help="patch size: grid = S / patch")
    p.add_argument("--feature-dim", type=int, default=1024, help="token width C")
    p.add_argument("--layers", type=int, default=4, help="number of feature layers")
    p.add_argument("--r", type=int, nargs="+", default=[1, 3, 5], help="LNAMD degrees")
    p.add_argument("--chunk-size", type=int, default=8, help="MSM block size (images)")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument(
        "--msm-dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="MSM neighbour search dtype (MuSc msm_dtype)",
    )
    p.add_argument(
        "--sample-sets",
        action="store_true",
        help="score one (layer, r) set and extrapolate the time x sets (see above)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.single is not None:
        print(json.dumps(_run_one(args)))
        return
    rows = []
    for n in args.n:
        cmd = [
            sys.executable,
            __file__,
            *(argv if argv is not None else sys.argv[1:]),
            "--single",
            str(n),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(json.dumps({"n_images": n, "error": out.stderr.strip()[-500:]}), flush=True)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if rows:
        print(
            f"\n{'N':>6} {'seconds':>10} {'ms/img':>9} {'peak RSS MB':>12} {'CUDA peak MB':>13} "
            f"{'features MB':>12} {'maps MB':>8} {'MSM block MB':>13}"
        )
        for r in rows:
            sec = f"{r['seconds']}{'*' if r['extrapolated'] else ''}"
            print(
                f"{r['n_images']:>6} {sec:>10} {r['ms_per_image']:>9} {r['peak_rss_mb']:>12} "
                f"{r.get('cuda_peak_mb', '-'):>13} {r['features_mb']:>12} {r['maps_mb']:>8} "
                f"{r['msm_block_mb']:>13}"
            )
        if any(r["extrapolated"] for r in rows):
            print("* measured on 1 (layer, r) set, x the number of sets (--sample-sets)")


if __name__ == "__main__":
    main()
