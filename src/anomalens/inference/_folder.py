"""Inspect a folder with an exported model: results.csv / .jsonl, masks and overlays (no torch).

The map resize, the mask rule and the heat-map colours are those of ``anomalens.viz.overlay`` /
``anomalens.results`` (the PyTorch path), re-expressed in numpy: bilinear resize with
half-pixel centres (``F.interpolate(..., align_corners=False)``), mask = map > pixel
threshold, matplotlib's ``jet`` colour map as a 256-entry table.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalens.inference._core import Inferencer, _image_io

__all__ = ["heatmap_rgb", "overlay", "resize_map", "run_folder"]

RESULT_FIELDS = ("path", "score", "decision", "threshold", "overlay", "mask", "seconds")

# matplotlib's "jet" segment data (x, y0, y1) per channel; the colour map is this table sampled
# at 256 points and looked up with int(v * 256) (matplotlib.colors.Colormap.__call__).
_JET = {
    "red": ((0.0, 0, 0), (0.35, 0, 0), (0.66, 1, 1), (0.89, 1, 1), (1.0, 0.5, 0.5)),
    "green": ((0.0, 0, 0), (0.125, 0, 0), (0.375, 1, 1), (0.64, 1, 1), (0.91, 0, 0), (1.0, 0, 0)),
    "blue": ((0.0, 0.5, 0.5), (0.11, 1, 1), (0.34, 1, 1), (0.65, 0, 0), (1.0, 0, 0)),
}


def _channel(points: tuple[tuple[float, float, float], ...], n: int) -> np.ndarray:
    """Piecewise-linear channel sampled at n points, with the float operations in the order
    matplotlib uses (so that rounding to uint8 lands on the same side of .5)."""
    x = np.array([p[0] for p in points], dtype=float) * (n - 1)
    y0 = np.array([p[1] for p in points], dtype=float)
    y1 = np.array([p[2] for p in points], dtype=float)
    xs = (n - 1) * np.linspace(0.0, 1.0, n)
    ind = np.searchsorted(x, xs)[1:-1]
    dist = (xs[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
    return np.concatenate([[y1[0]], dist * (y0[ind] - y1[ind - 1]) + y1[ind - 1], [y0[-1]]])


def _jet_table(n: int = 256) -> np.ndarray:
    return np.clip(np.stack([_channel(_JET[c], n) for c in _JET], axis=1), 0.0, 1.0)


_JET_TABLE = _jet_table()


def heatmap_rgb(normalized: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 ``jet`` colours (as matplotlib draws them)."""
    n = _JET_TABLE.shape[0]
    v = np.nan_to_num(np.asarray(normalized, dtype=np.float64), nan=0.0)
    idx = np.clip((v * n).astype(np.int64), 0, n - 1)
    return (_JET_TABLE[idx] * 255.0 + 0.5).astype(np.uint8)


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(scale) - 0.5, 0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinearly resize an (h, w) map to (height, width), float32, half-pixel centres."""
    m = np.asarray(anomaly_map, dtype=np.float32)
    if m.shape == (height, width):
        return m
    y0, y1, ly = _linear_weights(m.shape[0], height)
    x0, x1, lx = _linear_weights(m.shape[1], width)
    rows = m[y0] * (1 - ly)[:, None] + m[y1] * ly[:, None]  # (height, w)
    return (rows[:, x0] * (1 - lx)[None, :] + rows[:, x1] * lx[None, :]).astype(np.float32)


def _normalize(m: np.ndarray, vis_range: Any) -> np.ndarray:
    lo, hi = (float(m.min()), float(m.max())) if vis_range is None else map(float, vis_range)
    if hi <= lo:
        return np.zeros_like(m, dtype=np.float32)
    return np.clip((m - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _shift_and(m: np.ndarray) -> np.ndarray:
    """One binary erosion with the 4-neighbour cross, outside the image counted as False."""
    p = np.pad(m, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _shift_or(m: np.ndarray) -> np.ndarray:
    """One binary dilation with the 4-neighbour cross."""
    p = np.pad(m, 1, constant_values=False)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def overlay(
    image: np.ndarray,
    full_map: np.ndarray,
    *,
    vis_range: Any = None,
    mask: np.ndarray | None = None,
    alpha: float = 0.6,
    width: int = 2,
) -> np.ndarray:
    """The PyTorch path's overlay (``anomalens.viz.overlay.overlay``) in numpy alone.

    A translucent heat map whose opacity grows with the value (up to ``alpha``), then the
    predicted region's ``width``-pixel outline in white with a dark one-pixel halo outside it.

    Args:
        image: (H, W, 3) uint8.
        full_map: (H, W) map at the image's size.
        vis_range: (lo, hi) colour scale, or None for the map's own min/max.
        mask: (H, W) bool predicted region.
    """
    norm = _normalize(full_map, vis_range)
    heat = heatmap_rgb(norm).astype(np.float32)
    a = (np.clip(norm, 0.0, 1.0) * (255.0 * alpha) + 0.5).astype(np.uint8)
    a = a[..., None].astype(np.float32) / 255.0
    out = image.astype(np.float32) * (1.0 - a) + heat * a
    if mask is not None and np.asarray(mask).any():
        m = np.asarray(mask, dtype=bool)
        inner = m
        for _ in range(width):
            inner = _shift_and(inner)
        edge = m & ~inner
        halo = _shift_or(edge) & ~m
        out[halo] = out[halo] * (1.0 - 200 / 255.0)  # black at opacity 200/255
        out[edge] = 255.0
    return (out + 0.5).astype(np.uint8)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    _atomic_write(path, buf.getvalue())


def run_folder(
    inferencer: Inferencer,
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    save_overlays: bool = True,
    save_masks: bool = True,
    recursive: bool = False,
) -> list[dict[str, Any]]:
    """Score every image of a folder; write ``results.csv``, ``results.jsonl``, ``errors.csv``,
    ``masks/*.png`` and ``overlays/*.png`` (masks need a threshold in the model's metadata).

    Unreadable files are listed in ``errors.csv`` and the run goes on.

    Returns:
        One row per scored image (the ``results.csv`` columns).
    """
    io_mod = _image_io()
    src, out = Path(images_dir), Path(out_dir)
    paths = io_mod.list_images(src, recursive=recursive)
    if not paths:
        raise FileNotFoundError(f"no image files in {src} (extensions {io_mod.IMAGE_EXTENSIONS})")
    thr = inferencer.threshold
    vis_range = None if thr is None else thr.get("vis_range")
    pix = inferencer.pixel_threshold
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    used: set[str] = set()
    for s in range(0, len(paths), batch_size):
        loaded = []
        for p in paths[s : s + batch_size]:
            try:
                loaded.append((p, inferencer.read_image(p)))
            except (ValueError, OSError) as exc:
                errors.append({"path": str(p), "error": str(exc)})
        if not loaded:
            continue
        t0 = time.perf_counter()
        batch = np.stack([inferencer.resize(im) for _, im in loaded])
        scores, maps = inferencer.run(batch)
        per_image = (time.perf_counter() - t0) / len(loaded)
        for (p, im), score, amap in zip(loaded, scores, maps):
            rel = p.relative_to(src).with_suffix("")
            stem = "__".join(rel.parts)
            while stem in used:  # a.png and a.jpg: distinct result names
                stem += "_"
            used.add(stem)
            h, w = im.shape[:2]
            full = resize_map(amap, h, w)
            mask = None if pix is None else full > pix
            row: dict[str, Any] = {
                "path": str(p),
                "score": float(score),
                "decision": inferencer.decide(float(score)) or "",
                "threshold": "" if thr is None else float(thr["value"]),
                "overlay": "",
                "mask": "",
                "seconds": per_image,
            }
            if save_overlays:
                row["overlay"] = f"overlays/{stem}_overlay.png"
                _save_png(out / row["overlay"], overlay(im, full, vis_range=vis_range, mask=mask))
            if save_masks and mask is not None:
                row["mask"] = f"masks/{stem}_mask.png"
                _save_png(out / row["mask"], mask)
            rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS)
    w.writeheader()
    w.writerows(rows)
    _atomic_write(out / "results.csv", buf.getvalue().encode("utf-8"))
    jsonl = "".join(json.dumps(r) + "\n" for r in rows)
    _atomic_write(out / "results.jsonl", jsonl.encode("utf-8"))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=("path", "error"))
    w.writeheader()
    w.writerows(errors)
    _atomic_write(out / "errors.csv", buf.getvalue().encode("utf-8"))
    return rows
