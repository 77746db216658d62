"""Throughput and peak memory of exported detectors vs eager PyTorch, and the int8 accuracy cost.

For each model (PatchCore on the shared MobileNetV2 at 224 px; WinCLIP and AdaptCLIP on the
ViT-B-16-plus-240 architecture with random weights: speed does not depend on weight values) the
script fits the detector, exports it (onnx fp32, openvino fp32, onnx int8), then times every
backend in its own subprocess (so that peak RSS is the backend's own): one warm-up batch, then
``--n-images`` images at batch 1 and 8, on ``--threads`` CPU threads. Inputs are uint8 images
already at the model size (resize excluded for every backend). One JSON row per run:
images/s, ms/image, peak RSS (MiB), and a summary table at the end.

The int8 accuracy cost: PatchCore-MobileNetV2 on ../shared/data/magnetic_tile (2 shots, seeded
test subset): I-AUROC and P-AUROC of the fp32 and int8 (static, calibrated on train/good images)
ONNX graphs.

Usage:
    python benchmarks/export_speed.py                       # all models, 2 threads
    python benchmarks/export_speed.py --models patchcore --n-images 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
MOBILENET = SHARED / "weights" / "mobilenet_v2_imagenet_int8dequant.safetensors"
MAGNETIC_TILE = SHARED / "data" / "magnetic_tile"


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 smooth random images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size))) for x in low])


def _build(model: str):
    import torch

    from anomalens import create_detector
    from anomalens.backbones.clip import ClipBackbone

    torch.manual_seed(0)
    if model == "patchcore":
        weights = MOBILENET if MOBILENET.is_file() else "random"
        det = create_detector("patchcore", backbone="mobilenet_v2_tf", weights=weights)
        shots = _shots(2) or list(_images(2, 224, seed=1))
        return det.fit(shots)
    bb = ClipBackbone.create("ViT-B-16-plus-240", pretrained=None, image_size=240, seed=0)
    if model == "winclip":
        return create_detector("winclip", backbone=bb).fit(list(_images(2, 240, seed=1)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained adapters: fine for speed
        det = create_detector("adaptclip", backbone=bb, untrained=True)
    return det.fit(list(_images(2, 240, seed=1)))


def _shots(k: int) -> list[Path]:
    good = sorted((MAGNETIC_TILE / "train" / "good").glob("*.jpg"))
    rng = np.random.default_rng(1000)
    return [good[i] for i in sorted(rng.choice(len(good), k, replace=False))] if good else []


def _peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM; ``ru_maxrss`` would include the memory of
    the parent that forked it, copied before ``exec``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> None:
    """Time one backend; print one JSON line."""
    threads = args.threads
    size = args.size
    x = _images(args.n_images, size, seed=7)
    if args.backend == "torch":
        import torch

        torch.set_num_threads(threads)
        det = _build(args.model)

        def run(b: np.ndarray) -> None:
            det.predict(list(b))
    else:
        from anomalens.inference import load_inferencer

        inf = load_inferencer(args.model_dir, num_threads=threads)

        def run(b: np.ndarray) -> None:
            inf.run(b)

    bs = args.batch_size
    run(x[:bs])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(x), bs):
        run(x[s : s + bs])
    dt = time.perf_counter() - t0
    rss = _peak_rss_mib()
    print(
        "ROW "
        + json.dumps(
            {
                "model": args.model,
                "backend": args.label,
                "batch_size": bs,
                "threads": threads,
                "images": len(x),
                "images_per_s": round(len(x) / dt, 2),
                "ms_per_image": round(1000 * dt / len(x), 1),
                "peak_rss_mib": round(rss),
            }
        ),
        flush=True,
    )


def _spawn(extra: list[str], threads: int) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *extra, "--threads", str(threads)],
        capture_output=True,
        text=True,
        env=env,
    )
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        print(f"FAILED {extra}: {proc.stderr[-1500:]}", file=sys.stderr)
        return None
    row = json.loads(rows[-1])
    print(json.dumps(row), flush=True)
    return row


def _accuracy_cost(fp32_dir: Path, int8_dir: Path) -> dict:
    """I-AUROC / P-AUROC of the fp32 and int8 PatchCore graphs on a magnetic_tile subset."""
    from anomalens.data.io import load_mask
    from anomalens.data.transforms import resize_mask
    from anomalens.inference import load_inferencer
    from anomalens.metrics.image import auroc

    rng = np.random.default_rng(0)
    paths, labels, masks = [], [], []
    for kind in ("good", "blowhole", "break", "crack"):
        files = sorted((MAGNETIC_TILE / "test" / kind).glob("*.jpg"))
        pick = [files[i] for i in sorted(rng.choice(len(files), 8, replace=False))]
        for p in pick:
            paths.append(p)
            labels.append(int(kind != "good"))
            gt = MAGNETIC_TILE / "ground_truth" / kind / f"{p.stem}_mask.png"
            m = load_mask(gt) if kind != "good" else None
            masks.append(m)
    out: dict = {"images": len(paths)}
    for name, folder in (("fp32", fp32_dir), ("int8", int8_dir)):
        inf = load_inferencer(folder, num_threads=2)
        res = inf.predict(paths, batch_size=8)
        gts = [resize_mask(m, 224) if m is not None else np.zeros((224, 224), bool) for m in masks]
        out[f"{name}_i_auroc"] = auroc(res.image_score, np.array(labels))
        out[f"{name}_p_auroc"] = auroc(res.anomaly_map.ravel(), np.stack(gts).ravel().astype(int))
        out[f"{name}_scores"] = res.image_score
    out["i_auroc_delta"] = out["int8_i_auroc"] - out["fp32_i_auroc"]
    out["p_auroc_delta"] = out["int8_p_auroc"] - out["fp32_p_auroc"]
    out["max_score_change"] = float(np.abs(out.pop("int8_scores") - out.pop("fp32_scores")).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["patchcore", "winclip", "adaptclip"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--label", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    import torch

    from anomalens.export import export_detector

    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    accuracy = None
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            det = _build(model)
            size = det.image_size
            calib = _shots(8) if model == "patchcore" and _shots(1) else list(_images(4, size, 3))
            dirs = {}
            for label, kw in (
                ("onnxruntime fp32", {"format": "onnx"}),
                ("openvino fp32", {"format": "openvino"}),
                (
                    "onnxruntime int8",
                    {"format": "onnx", "quantize": "int8", "calibration_images": calib},
                ),
            ):
                t0 = time.perf_counter()
                dirs[label] = export_detector(
                    det, Path(tmp) / f"{model}-{label.replace(' ', '-')}", **kw
                )
                print(f"# exported {model} {label} in {time.perf_counter() - t0:.1f} s", flush=True)
            if model == "patchcore" and _shots(1):
                accuracy = _accuracy_cost(dirs["onnxruntime fp32"], dirs["onnxruntime int8"])
                print("# int8 accuracy cost:", json.dumps(accuracy), flush=True)
            del det
            for bs in args.batch_sizes:
                base = ["--model", model, "--size", str(size), "--batch-size", str(bs)]
                base += ["--n-images", str(args.n_images)]
                row = _spawn(
                    [*base, "--backend", "torch", "--label", "pytorch eager"], args.threads
                )
                rows += [row] if row else []
                for label, folder in dirs.items():
                    extra = [*base, "--backend", "exported", "--label", label]
                    row = _spawn([*extra, "--model-dir", str(folder)], args.threads)
                    rows += [row] if row else []
    print("\n| model | backend | batch | images/s | ms/image | peak RSS MiB | vs eager |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        eager = next(
            (
                e
                for e in rows
                if e["model"] == r["model"]
                and e["batch_size"] == r["batch_size"]
                and e["backend"] == "pytorch eager"
            ),
            None,
        )
        ratio = f"{r['images_per_s'] / eager['images_per_s']:.2f}x" if eager else ""
        print(
            f"| {r['model']} | {r['backend']} | {r['batch_size']} | {r['images_per_s']} | "
            f"{r['ms_per_image']} | {r['peak_rss_mib']} | {ratio} |"
        )
    if accuracy:
        print(
            f"\nint8 (static, onnxruntime) vs fp32 on magnetic_tile ({accuracy['images']} images): "
            f"I-AUROC {accuracy['fp32_i_auroc']:.4f} -> {accuracy['int8_i_auroc']:.4f} "
            f"({accuracy['i_auroc_delta']:+.4f}), P-AUROC {accuracy['fp32_p_auroc']:.4f} -> "
            f"{accuracy['int8_p_auroc']:.4f} ({accuracy['p_auroc_delta']:+.4f}), largest image "
            f"score change {accuracy['max_score_change']:.4g}"
        )


if __name__ == "__main__":
    main()
