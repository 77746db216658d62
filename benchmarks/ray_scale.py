"""Throughput of ``predict --engine ray`` with 1 and 2 workers against the single-process path.

PatchCore on the shared TF-converted MobileNetV2 (preset ``mobilenet_v2_tf``, 224 px) is fitted
once on ``--shots`` normal images and saved as a model file (as ``anomalens fit`` does); the same
fitted detector then scores ``--n-images`` synthetic images (seeded generator, half with
defects) three ways, every output written (rows, overlays, masks, maps, report):

* ``local``: :func:`anomalens.pipeline.run_predict` in this process;
* ``ray-1`` / ``ray-2``: :func:`anomalens.distributed.run_predict_ray` with 1 and 2 actors on a
  private Ray instance (started once beforehand, its start-up time printed separately).

Printed per run: wall seconds, images/s, and for the Ray runs the per-image overhead against
the local run, ``(t_ray - t_local) / n``, and the scaling efficiency ``speed-up / workers``
relative to the single-process run. Each Ray run includes its actors' start-up (loading torch
and the model once per actor), which a long run amortises; that fixed part is estimated from
a short run (two batches): the wall time of a 1-worker Ray run minus the local run's on the same
images.

Usage:
    python benchmarks/ray_scale.py                      # 2,000 images, 224 px
    python benchmarks/ray_scale.py --n-images 200       # quick look

The machine's CPU count bounds what 2 workers can gain; on a shared machine timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

SHARED_WEIGHTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights"
WEIGHTS = SHARED_WEIGHTS / "mobilenet_v2_imagenet_int8dequant.safetensors"


def _images(root: Path, n: int, size: int, shots: int) -> tuple[list[Path], list[Path]]:
    """(normal images, images to score) from the seeded synthetic generator, cached in root."""
    from anomalens.data.synthetic import generate_synthetic_dataset, list_synthetic_categories

    cat = list_synthetic_categories()[0]
    data = root / f"synth_{n}_{size}"
    if not (data / cat / "test").is_dir():
        generate_synthetic_dataset(
            data,
            categories=[cat],
            n_train=shots,
            n_test_good=n - n // 2,
            n_test_defect=n // 2,
            image_size=size,
            seed=0,
            overwrite=True,
        )
    normals = sorted((data / cat / "train" / "good").glob("*.png"))
    test = sorted(p for p in (data / cat / "test").rglob("*.png"))
    return normals, test[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--work", default="/tmp/anomalens_ray_scale", help="scratch folder")
    args = ap.parse_args()

    import ray
    import torch

    from anomalens.distributed import RayOptions, run_predict_ray
    from anomalens.pipeline import ThresholdSpec, fit_model, load_model_for_predict, run_predict
    from anomalens.registry import create_detector

    torch.set_num_threads(1)  # one thread per worker, as each Ray actor gets one CPU
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    normals, images = _images(work, args.n_images, args.image_size, args.shots)
    print(f"{len(images)} images at {args.image_size} px ready ({time.perf_counter() - t:.1f} s)")
    weights = Path(args.weights)
    if not weights.is_file():
        raise SystemExit(f"error: weights {weights} not found (the team's shared/weights)")

    def make() -> Any:
        return create_detector(
            "patchcore",
            backbone="mobilenet_v2_tf",
            weights=str(weights),
            image_size=args.image_size,
        )

    model = work / "model"
    fit_model(make, normals, model, threshold=ThresholdSpec())
    detector, thr = load_model_for_predict(model)

    def timed(name: str, fn: Any) -> dict[str, Any]:
        out = work / f"out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        s = fn(out)
        sec = time.perf_counter() - t0
        row = {"run": name, "images": s.num_scored, "seconds": sec, "img_per_s": s.num_scored / sec}
        print(json.dumps(row))
        return row

    common: dict[str, Any] = {
        "detector": detector,
        "model_threshold": thr,
        "batch_size": args.batch_size,
        "resume": False,
        "progress": False,
    }
    rows = [timed("local", lambda out: run_predict(None, images, out, **common))]
    t0 = time.perf_counter()
    ray.init(num_cpus=max(os.cpu_count() or 1, max(args.workers)), include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(json.dumps({"run": "ray.init", "seconds": time.perf_counter() - t0}))
    warm = images[: max(args.batch_size, 2 * args.batch_size)]
    try:
        w_local = timed("local-warm", lambda out: run_predict(None, warm, out, **common))
        w_ray = timed(
            "ray-1-warm",
            lambda out: run_predict_ray(None, warm, out, options=RayOptions(workers=1), **common),
        )
        fixed = w_ray["seconds"] - w_local["seconds"]
        for w in args.workers:
            row = timed(
                f"ray-{w}",
                lambda out, w=w: run_predict_ray(
                    None, images, out, options=RayOptions(workers=w), **common
                ),
            )
            row["workers"] = w
            rows.append(row)
    finally:
        ray.shutdown()
    local = rows[0]
    n = local["images"]
    print(
        f"\n{n} images, PatchCore mobilenet_v2_tf {args.image_size} px, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs; Ray fixed start-up (actor + model load) ~{fixed:.1f} s"
    )
    print("| run | s | img/s | overhead ms/img | speed-up | efficiency |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| local | {local['seconds']:.1f} | {local['img_per_s']:.1f} | - | 1.00 | - |")
    for r in rows[1:]:
        over = (r["seconds"] - local["seconds"]) / n * 1000
        speed = local["seconds"] / r["seconds"]
        print(
            f"| ray, {r['workers']} worker(s) | {r['seconds']:.1f} | {r['img_per_s']:.1f} | "
            f"{over:.1f} | {speed:.2f} | {speed / r['workers']:.2f} |"
        )


if __name__ == "__main__":
    main()
