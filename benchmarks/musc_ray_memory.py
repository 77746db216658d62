"""Memory per worker and data moved by MuSc on Ray (``predict --method musc --engine ray``).

Nothing is run: the figures come from the shapes alone
(:func:`anomalens.detectors.musc.musc_shard_cost`, the formula the run logs at its start).
For each batch size N and shard size s it prints, for the scoring stage of one worker:

* ``worker_gib``: its peak memory (model not included): the shard's tokens, two LNAMD feature
  sets, the kept smallest NN distances (s x L x ~0.3 N float32: the part that grows with N),
  one merge, one distance block, the MSM scores, float64 upsampling of 16 maps;
* ``kept_gib``: the kept distances alone;
* ``features_gib``: tokens of the whole batch, written once to ``OUT/musc-work``;
* ``read_gib``: what scoring one shard reads (every shard's tokens, once per r);
* ``shards`` and ``msm_tflop``: shard count and the mutual-scoring work of one shard.

Default: the paper setting, ViT-L-14-336 at 518 px (4 layers of L = 1369 tokens x C = 1024,
r = 1, 3, 5, float32 tokens and search, chunk_size 8, interval [0, 0.3)).

    python benchmarks/musc_ray_memory.py
    python benchmarks/musc_ray_memory.py --n 2000 20000 --shard-size 32 128 --feature-bytes 2
"""

from __future__ import annotations

import argparse

from anomalens.detectors.musc import musc_shard_cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--shard-size", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--tokens", type=int, default=1369, help="L per layer (37 x 37 at 518 px)")
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--num-r", type=int, default=3)
    ap.add_argument("--feature-bytes", type=int, default=4, help="2 for feature_dtype=float16")
    ap.add_argument("--msm-bytes", type=int, default=4, help="2 for msm_dtype=bfloat16")
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()
    shapes = [(args.tokens, args.channels)] * args.layers
    gib = 2.0**30
    print(
        f"{'N':>8} {'s':>5} {'shards':>7} {'worker_gib':>11} {'kept_gib':>9} "
        f"{'features_gib':>13} {'read_gib':>9} {'msm_tflop':>10}"
    )
    for n in args.n:
        for s in args.shard_size:
            c = musc_shard_cost(
                s,
                n,
                shapes,
                args.num_r,
                args.feature_bytes,
                args.msm_bytes,
                args.image_size,
                args.chunk,
            )
            flop = 2.0 * args.num_r * s * n * sum(L * L * C for L, C in shapes)
            print(
                f"{n:>8} {s:>5} {-(-n // s):>7} {c['memory_bytes'] / gib:>11.2f} "
                f"{c['kept_bytes'] / gib:>9.2f} {c['features_bytes'] / gib:>13.1f} "
                f"{c['read_bytes'] / gib:>9.1f} {flop / 1e12:>10.0f}"
            )


if __name__ == "__main__":
    main()
