"""Fit once vs refit: time and size of saving / loading a fitted model, per method.

For each method the detector is built and fitted on ``--shots`` normal images (leave-one-out
threshold calibration is not included), then saved with referenced weights and with embedded
weights, and loaded back. Printed per row: fit seconds, save seconds, file size, load seconds,
and whether the loaded detector's scores and maps are bit-identical to the saved one's.
Loading replaces the fit of ``anomalens predict`` when ``--model`` is used.

Usage:
    python benchmarks/model_file_speed.py                     # PatchCore / MVG on resnet18 (random
                                                              # weights), tiny-CLIP WinCLIP, 64 px
    python benchmarks/model_file_speed.py --weights ../shared/weights/mobilenet_v2_imagenet_int8dequant.safetensors \
        --backbone mobilenet_v2_tf --image-size 224 --shots 4

One flat JSON row per (method, weights mode) is printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from anomalens import create_detector, load_detector
from anomalens.detectors.base import Detector


def synthetic_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n seeded random RGB images, uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(80, 160, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(name: str, build: Callable[[], Detector], shots: int, size: int, tmp: Path) -> None:
    normals = synthetic_images(shots, size, seed=1)
    test = synthetic_images(4, size, seed=2)
    det = build()
    t0 = time.perf_counter()
    det.fit(normals if det.uses_normal_images else None)
    fit_s = time.perf_counter() - t0
    ref = det.predict(test)
    for embed in (False, True):
        out = tmp / f"{name}-{'embedded' if embed else 'referenced'}.anomalens"
        try:
            t0 = time.perf_counter()
            det.save(out, embed_weights=embed)
            save_s = time.perf_counter() - t0
        except ValueError as exc:
            print(json.dumps({"method": name, "embed_weights": embed, "error": str(exc)}))
            continue
        t0 = time.perf_counter()
        loaded = load_detector(out)
        load_s = time.perf_counter() - t0
        got = loaded.predict(test)
        same = torch.equal(ref.image_score, got.image_score) and torch.equal(
            ref.anomaly_map, got.anomaly_map
        )
        row = {
            "method": name,
            "embed_weights": embed,
            "shots": shots,
            "image_size": det.image_size,
            "fit_s": round(fit_s, 3),
            "save_s": round(save_s, 3),
            "file_mb": round(_size(out) / 2**20, 2),
            "load_s": round(load_s, 3),
            "bit_identical": same,
        }
        print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*untrained.*")
    cnn = {"backbone": args.backbone, "weights": args.weights, "image_size": args.image_size}
    if args.backbone == "mobilenet_v2_tf":
        cnn["tf_padding"] = True
    builders: dict[str, Callable[[], Detector]] = {
        "patchcore": lambda: create_detector("patchcore", **cnn),
        "mvg": lambda: create_detector("mvg", **cnn),
        "winclip-tiny": lambda: create_detector(
            "winclip", model_name="anomalens-tiny-clip", pretrained=None, image_size=64
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in builders.items():
            run(name, build, args.shots, args.image_size, Path(tmp))


if __name__ == "__main__":
    main()
