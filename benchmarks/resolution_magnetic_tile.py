"""Squash vs letterbox vs tiling on Magnetic Tile: image / pixel metrics and mask IoU.

For each method, view mode and seed: k normal images drawn from ``train/good`` (the seed),
the no-label threshold ``predict`` uses (leave-one-out on the k shots: image and pixel
threshold), the test split scored, maps resized to each image's own size (as ``predict`` does).
Prints a markdown table of means ± std over the seeds:

* I-AUROC, I-AP (threshold-free, image level), P-AUROC, P-AUPRO (pixel level, image size);
* recall and false-alarm rate of the image decision at the calibrated threshold;
* mean mask IoU at the calibrated thresholds, over the defective images (the mask is empty when
  the image is judged normal, as in ``predict``'s outputs) and the share of normal images with
  a drawn region.

Usage::

    python benchmarks/resolution_magnetic_tile.py --root ../shared/data/magnetic_tile \\
        --weights ../shared/weights/mobilenet_v2_imagenet_int8dequant.safetensors \\
        --methods patchcore mvg --seeds 10 20 30 --max-test-images 120 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from anomalens.benchmark.runner import _subsample
from anomalens.data.io import load_image, load_mask
from anomalens.data.mvtec import make_mvtec_index
from anomalens.data.sampling import sample_shots
from anomalens.geometry import ImageViews, with_views
from anomalens.metrics import PixelMetricAccumulator, image_metrics
from anomalens.registry import create_detector
from anomalens.results import judge_image
from anomalens.thresholds import calibrate_leave_one_out

MODES = {
    "squash": lambda tile: ImageViews(),
    "letterbox": lambda tile: ImageViews(resize="letterbox"),
    "tile": lambda tile: ImageViews(tile=tile, tile_overlap=0.25),
    "tile+letterbox": lambda tile: ImageViews(resize="letterbox", tile=tile, tile_overlap=0.25),
}


def run_one(
    method: str, mode: str, seed: int, args: argparse.Namespace, train: list, test: list
) -> dict[str, Any]:
    """Metrics of one (method, mode, seed) run."""
    views = MODES[mode](args.tile)

    def make() -> Any:
        opts: dict[str, Any] = {"backbone": args.backbone, "device": args.device}
        if args.weights:
            opts["weights"] = args.weights
        return with_views(create_detector(method, **opts), views)

    shots = [load_image(s.image_path) for s in sample_shots(train, args.shots, seed)]
    t0 = time.perf_counter()
    thr = calibrate_leave_one_out(make, shots)
    det = make().fit(shots)
    acc = PixelMetricAccumulator(mode="exact")
    scores, labels, ious, normal_regions, caught = [], [], [], [], 0
    for i in range(0, len(test), args.batch_size):
        batch = test[i : i + args.batch_size]
        images = [load_image(s.image_path) for s in batch]
        pred = det.predict(images)
        for s, im, score, amap in zip(
            batch, images, pred.image_score.numpy(), pred.anomaly_map.numpy()
        ):
            judged = judge_image(im, amap, float(score), thr)
            gt = load_mask(s.mask_path, im.shape[:2]) if s.label == 1 else None
            gt = np.zeros(im.shape[:2], bool) if gt is None else gt.astype(bool)
            acc.update(judged.anomaly_map[None], gt[None])
            scores.append(float(score))
            labels.append(int(s.label))
            if s.label == 1:
                union = np.logical_or(judged.mask, gt).sum()
                ious.append(float(np.logical_and(judged.mask, gt).sum() / max(union, 1)))
                caught += judged.decision == "anomalous"
            else:
                normal_regions.append(bool(judged.mask.any()))
    seconds = time.perf_counter() - t0
    s_arr, l_arr = np.array(scores), np.array(labels)
    im = image_metrics(s_arr, l_arr)
    px = acc.compute()
    pred_anom = s_arr > thr.value
    return {
        "method": method,
        "mode": mode,
        "seed": seed,
        "image_auroc": im["image_auroc"],
        "image_ap": im["image_ap"],
        "pixel_auroc": px["pixel_auroc"],
        "pixel_aupro": px["pixel_aupro"],
        "recall_at_thr": float(pred_anom[l_arr == 1].mean()),
        "false_alarm_at_thr": float(pred_anom[l_arr == 0].mean()),
        "mean_mask_iou": float(np.mean(ious)) if ious else float("nan"),
        "normal_with_region": float(np.mean(normal_regions)) if normal_regions else float("nan"),
        "caught": int(caught),
        "num_defective": int((l_arr == 1).sum()),
        "num_test": len(test),
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="../shared/data/magnetic_tile")
    p.add_argument("--weights", default=None)
    p.add_argument("--backbone", default="mobilenet_v2_tf")
    p.add_argument("--methods", nargs="+", default=["patchcore", "mvg"])
    p.add_argument("--modes", nargs="+", default=["squash", "letterbox", "tile"], choices=MODES)
    p.add_argument("--seeds", nargs="+", type=int, default=[10, 20, 30])
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--tile", type=int, default=224, help="tile side in image pixels")
    p.add_argument("--max-test-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="write every run's row here")
    args = p.parse_args()

    train = [s for s in make_mvtec_index(args.root, None, "train") if s.label == 0]
    test = _subsample(make_mvtec_index(args.root, None, "test"), args.max_test_images)
    rows = []
    for method in args.methods:
        for mode in args.modes:
            for seed in args.seeds:
                row = run_one(method, mode, seed, args, train, test)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    keys = [
        "image_auroc",
        "image_ap",
        "pixel_auroc",
        "pixel_aupro",
        "recall_at_thr",
        "false_alarm_at_thr",
        "mean_mask_iou",
        "normal_with_region",
        "seconds",
    ]
    print(f"\n{len(test)} test images, {args.shots} shots, seeds {args.seeds}\n")
    print("| method | views | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for method in args.methods:
        for mode in args.modes:
            sel = [r for r in rows if r["method"] == method and r["mode"] == mode]
            cells = []
            for k in keys:
                v = np.array([r[k] for r in sel], dtype=float)
                scale = 1 if k == "seconds" else 100
                cells.append(f"{np.nanmean(v) * scale:.1f} ± {np.nanstd(v) * scale:.1f}")
            print(f"| {method} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
