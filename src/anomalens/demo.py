"""The offline demo: synthetic defects -> few-shot PatchCore -> reports with overlays.

Everything runs without internet. Backbone weights, in order of preference: ``--weights``
(with ``--backbone``), ``$ANOMALENS_DEMO_WEIGHTS`` (with ``$ANOMALENS_DEMO_BACKBONE``),
torchvision's MobileNetV2 in the anomalens cache (``anomalens weights download mobilenet_v2
--to DIR``), and finally randomly initialised features, which still find the synthetic defects
but are marked as such in every output. The backbone preset defaults to ``mobilenet_v2``
(torchvision's preprocessing); a TF-converted MobileNetV2 needs ``mobilenet_v2_tf``.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
from pathlib import Path

from anomalens.backbones.weights import WeightNotAvailableError, resolve_weights
from anomalens.fileio import atomic_write_text

__all__ = ["pick_demo_weights", "run_demo"]

log = logging.getLogger(__name__)
DEFAULT_BACKBONE = "mobilenet_v2"


def pick_demo_weights(weights: str | None, backbone: str | None = None) -> tuple[str, str, str]:
    """Choose (backbone preset, weights, human-readable origin) for the demo.

    Args:
        weights: a weights file (``--weights``), or None to look further.
        backbone: the preset the file was made for (``--backbone``); None:
            ``$ANOMALENS_DEMO_BACKBONE`` or ``mobilenet_v2``. Never guessed from a file name.
    """
    preset = backbone or os.environ.get("ANOMALENS_DEMO_BACKBONE") or DEFAULT_BACKBONE
    if weights:
        return (preset, weights, f"--weights {weights}")
    env = os.environ.get("ANOMALENS_DEMO_WEIGHTS")
    if env:
        return (preset, env, f"$ANOMALENS_DEMO_WEIGHTS={env}")
    try:
        path = resolve_weights("mobilenet_v2", offline=True)
        return ("mobilenet_v2", str(path), f"torchvision MobileNetV2 from the cache ({path})")
    except WeightNotAvailableError:
        pass
    log.warning(
        "no pretrained CNN weights found offline: the demo uses RANDOM features. "
        "For real features run `anomalens weights download mobilenet_v2 --to DIR` on a "
        "connected machine and pass --weights DIR/mobilenet_v2-b0353104.pth"
    )
    return (preset, "random", "RANDOM weights (no pretrained file found offline)")


def run_demo(
    out: str | Path,
    *,
    weights: str | None = None,
    backbone: str | None = None,
    seed: int = 0,
    progress: bool = True,
    categories: list[str] | None = None,
    image_size: int = 256,
) -> Path:
    """Generate data, inspect every category, benchmark k=1 and k=4, write ``OUT/index.html``.

    Args:
        out: output folder.
        weights: CNN weights (see the module docstring for the default order).
        seed: seed of the synthetic data and of the reference draws.
        categories: synthetic categories (default: all).
        image_size: size of the generated images.
    """
    from anomalens.benchmark.runner import BenchmarkConfig, run_benchmark
    from anomalens.data.io import list_images
    from anomalens.data.synthetic import generate_synthetic_dataset, list_synthetic_categories
    from anomalens.pipeline import run_predict
    from anomalens.registry import create_detector

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backbone, w, origin = pick_demo_weights(weights, backbone)
    print(f"[demo] backbone {backbone}, weights: {origin}")
    cats = categories or list_synthetic_categories()
    data = generate_synthetic_dataset(
        out / "data",
        categories=cats,
        n_train=8,
        n_test_good=6,
        n_test_defect=10,
        image_size=image_size,
        seed=seed,
    )
    print(f"[demo] synthetic dataset written to {data} ({len(cats)} categories)")
    kwargs = {"backbone": backbone, "weights": w}
    links = []
    for cat in cats:
        normals = list_images(data / cat / "train" / "good")[:4]
        images = list_images(data / cat / "test", recursive=True)
        s = run_predict(
            lambda: create_detector("patchcore", **kwargs),
            images,
            out / "inspect" / cat,
            normal_paths=normals,
            progress=progress,
            title=f"anomalens demo: {cat} (PatchCore, 4 normal images, {origin})",
        )
        print(
            f"[demo] {cat:<12} {s.num_scored} images, {s.num_anomalous} flagged anomalous "
            f"(threshold {s.threshold.value:.4f}, leave-one-out on 4 shots)"
        )
        links.append((cat, f"inspect/{cat}/report.html", s.num_scored, s.num_anomalous))
    bench = out / "benchmark"
    prev = bench / "config.json"
    if prev.is_file() and json.loads(prev.read_text(encoding="utf-8"))["method_kwargs"] != kwargs:
        shutil.rmtree(bench)  # an earlier demo with other weights: its numbers do not apply
    cfg = BenchmarkConfig(
        method="patchcore",
        dataset="mvtec",
        root=str(data),
        out=str(bench),
        shots=[1, 4],
        seeds=[seed],
        method_kwargs=kwargs,
    )
    run_benchmark(cfg, progress=progress)
    table = (out / "benchmark" / "results.md").read_text()
    print(table)
    items = "".join(
        f"<li><a href='{html.escape(h)}'>{html.escape(c)}</a>: {n} images, {a} flagged</li>"
        for c, h, n, a in links
    )
    atomic_write_text(
        out / "index.html",
        "<!doctype html><meta charset='utf-8'><title>anomalens demo</title>"
        "<body style='font-family:sans-serif'><h1>anomalens demo</h1>"
        f"<p>Few-shot PatchCore on seeded synthetic defects; backbone weights: {html.escape(origin)}.</p>"
        f"<h2>Inspection reports</h2><ul>{items}</ul>"
        f"<h2>Benchmark (ground-truth metrics)</h2><pre>{html.escape(table)}</pre></body>\n",
    )
    print(f"[demo] open {out / 'index.html'}")
    return out / "index.html"
