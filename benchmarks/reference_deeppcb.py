"""Reference-based inspection on DeepPCB: pixel AUROC / AP / AUPRO per method, seconds per pair.

Every test image is scored against its own template (k = 1); boxes painted as masks with
inclusive corners; metrics pooled over all pixels of all pairs at the images' 640 px (maps are
resized to the image). Also a held-out check of the ``refdiff`` defaults: (tolerance, sigma)
chosen on one group only from a small grid, then measured on the other groups.

    python benchmarks/reference_deeppcb.py --root ../shared/data/deeppcb --threads 2
    python benchmarks/reference_deeppcb.py --methods refdiff patchcore224 --max-pairs 60
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings

import torch

from anomalens.benchmark.pairs import evaluate_pairs
from anomalens.data.registry import get_index, list_categories
from anomalens.registry import create_detector

SHARED_MOBILENET = "../shared/weights/mobilenet_v2_imagenet_int8dequant.safetensors"
METHODS = {
    "absdiff": ("refdiff", {"tolerance": 0, "sigma": 0.0}),
    "absdiff_sigma2": ("refdiff", {"tolerance": 0, "sigma": 2.0}),
    "refdiff": ("refdiff", {}),
    "patchcore224": (
        "patchcore",
        {"backbone": "mobilenet_v2_tf", "weights": SHARED_MOBILENET, "image_size": 224},
    ),
    "patchcore640": (
        "patchcore",
        {"backbone": "mobilenet_v2_tf", "weights": SHARED_MOBILENET, "image_size": 640},
    ),
}


def _fmt(m: dict) -> str:
    return (
        f"P-AUROC {100 * m['pixel_auroc']:.1f}  P-AP {100 * m['pixel_ap']:.1f}  "
        f"P-AUPRO {100 * m['pixel_aupro']:.1f}  {m['seconds_per_image']:.3f} s/pair"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/deeppcb")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["absdiff", "absdiff_sigma2", "refdiff", "patchcore224"],
        choices=list(METHODS),
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-pairs", type=int, help="first N pairs of each group (quick runs)")
    ap.add_argument("--no-heldout", action="store_true", help="skip the held-out parameter check")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    groups = list_categories("pairs", args.root)
    per_group = {g: get_index("pairs", args.root, g, "test")[: args.max_pairs] for g in groups}
    pairs = [s for g in groups for s in per_group[g]]
    print(f"DeepPCB: {len(pairs)} pairs in {', '.join(groups)}; torch threads {args.threads}")
    for name in args.methods:
        method, opts = METHODS[name]
        det = create_detector(method, **opts)
        t = time.perf_counter()
        m = evaluate_pairs(det, pairs)
        print(f"{name:<16} {_fmt(m)}  (wall {time.perf_counter() - t:.0f} s)", flush=True)
    if args.no_heldout:
        return
    tune, rest = groups[0], groups[1:]
    best = None
    for r, sigma in itertools.product((1, 2, 3, 4), (4.0, 6.0, 8.0, 12.0)):
        m = evaluate_pairs(create_detector("refdiff", tolerance=r, sigma=sigma), per_group[tune])
        key = m["pixel_ap"] + m["pixel_aupro"]
        if best is None or key > best[0]:
            best = (key, r, sigma)
    _, r, sigma = best
    held = [s for g in rest for s in per_group[g]]
    m = evaluate_pairs(create_detector("refdiff", tolerance=r, sigma=sigma), held)
    d = evaluate_pairs(create_detector("refdiff"), held)
    print(f"held-out: chose tolerance={r}, sigma={sigma} on {tune} (max P-AP + P-AUPRO);")
    print(f"  on {', '.join(rest)}: chosen {_fmt(m)}")
    print(f"  on {', '.join(rest)}: default {_fmt(d)}")


if __name__ == "__main__":
    main()
