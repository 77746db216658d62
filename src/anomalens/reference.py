"""Reference-based inspection: each image scored against its own normal reference.

``anomalens predict --pairs pairs.csv`` or ``--reference-dir DIR`` (see
:mod:`anomalens.data.pairs` for the pairing rules). For every pair the detector is fitted on the
reference alone (k = 1: ``refdiff``, PatchCore, MVG, WinCLIP+, AdaptCLIP 1-shot, MetaUAS) after an
optional alignment of the image to the reference (:mod:`anomalens.data.align`), and the map is
brought back onto the original image, where overlays and masks are drawn.

Two passes, both resumable: scoring writes ``scored.jsonl`` and one ``maps/<name>.npy`` per image
(float16, the map in the image's frame at most 1024 px on its long side); judging sets the
threshold and writes the same outputs as :func:`anomalens.pipeline.run_predict` (results.csv /
jsonl, overlays, masks, errors.csv, report, run.json). Thresholds without labels: a fixed
``--threshold``, a pairs file of known-good pairs (``calibration``: a percentile of their scores),
or by default the batch itself, assumed mostly normal (median + 3 x 1.4826 x MAD of the scores).
A pair whose image or reference cannot be read gets an ``errors.csv`` row; the batch goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from anomalens.data.align import ALIGN_METHODS, align_to_reference, map_to_image
from anomalens.data.io import ImageReadError, load_image
from anomalens.detectors.base import Detector
from anomalens.fileio import atomic_write_json, atomic_write_text
from anomalens.pipeline import (
    PredictSummary,
    _run_meta,
    _unique_names,
    _write_outputs,
    display_path,
    file_problem,
)
from anomalens.results import judge_image, write_result_images
from anomalens.thresholds import Threshold, batch_robust_threshold, fixed_threshold
from anomalens.types import Sample

__all__ = ["PairsThreshold", "run_predict_pairs"]

log = logging.getLogger(__name__)
MAX_MAP_SIDE = 1024


@dataclass
class PairsThreshold:
    """How a pairs run sets its threshold.

    Attributes:
        fixed: a user-given image threshold (and ``pixel_fixed`` for masks).
        calibration: known-good pairs; the threshold is the ``percentile`` of their scores.
        percentile: see ``calibration`` (default 99).
        margin: multiplier on the calibrated value.
    """

    fixed: float | None = None
    pixel_fixed: float | None = None
    calibration: Sequence[Sample] | None = None
    percentile: float = 99.0
    margin: float = 1.0


def _read(
    path: Path | None, what: str, errors: list[dict[str, str]], key: str
) -> np.ndarray | None:
    if path is None:
        errors.append({"path": key, "error": f"no {what} found for this image"})
        return None
    reason = file_problem(path)
    if reason is None:
        try:
            return load_image(path)
        except ImageReadError as exc:
            reason = exc.reason
        except OSError as exc:
            reason = f"cannot read the file: {exc.strerror or exc}"
    errors.append({"path": key, "error": f"{what} {display_path(path)}: {reason}"})
    return None


def _score_pair(
    detector: Detector, image: np.ndarray, reference: np.ndarray, align: str, category: str | None
) -> tuple[float, np.ndarray, dict[str, Any]]:
    """Fit on the reference, score the aligned image; the map in the image's frame."""
    al = align_to_reference(image, reference, align)
    detector.fit([al.reference], category=category)
    pred = detector.predict([al.aligned])
    score, amap = pred.to_numpy()
    rh, rw = al.reference.shape[:2]
    from anomalens.viz.overlay import resize_map

    in_ref = resize_map(amap[0], rh, rw)
    info = {"align_ok": al.ok, **({"align": al.details} if al.details else {})}
    return float(score[0]), map_to_image(in_ref, al, image.shape[:2]), info


def _small(amap: np.ndarray) -> np.ndarray:
    h, w = amap.shape
    f = MAX_MAP_SIDE / max(h, w)
    if f >= 1:
        return amap.astype(np.float16)
    from anomalens.viz.overlay import resize_map

    return resize_map(amap, max(1, round(h * f)), max(1, round(w * f))).astype(np.float16)


def _calibrate(
    detector: Detector, spec: PairsThreshold, align: str, category: str | None
) -> Threshold:
    errors: list[dict[str, str]] = []
    scores, maps = [], []
    for s in spec.calibration or []:
        key = display_path(s.image_path)
        im = _read(s.image_path, "image", errors, key)
        ref = _read(s.reference_path, "reference", errors, key)
        if im is None or ref is None:
            continue
        sc, amap, _ = _score_pair(detector, im, ref, align, category)
        scores.append(sc)
        maps.append(_small(amap).astype(np.float32).reshape(-1))
    if not scores:
        raise ValueError(
            "no calibration pair could be scored: " + "; ".join(e["error"] for e in errors[:3])
        )
    arr = np.asarray(scores)
    pix = np.concatenate(maps)
    value = float(np.percentile(arr, spec.percentile)) * spec.margin
    pixel = float(np.percentile(pix, 99.9)) * spec.margin
    lo = float(np.percentile(pix, 1.0))
    return Threshold(
        value,
        pixel,
        "normal-pairs",
        {"percentile": spec.percentile, "margin": spec.margin, "num_pairs": len(scores)},
        vis_range=(lo, max(2 * pixel - lo, pixel + 1e-6)),
    )


def run_predict_pairs(
    make_detector: Callable[[], Detector],
    pairs: Sequence[Sample],
    out_dir: str | Path,
    *,
    align: str = "none",
    threshold: PairsThreshold | None = None,
    category: str | None = None,
    save_overlays: bool = True,
    save_masks: bool = True,
    resume: bool = True,
    progress: bool = True,
    title: str = "anomalens reference-based inspection",
    config: dict[str, Any] | None = None,
) -> PredictSummary:
    """Score every image against its own reference and write all outputs into ``out_dir``.

    Args:
        make_detector: builds the detector (fitted here on each pair's reference, k = 1).
        pairs: Samples with ``image_path`` and ``reference_path`` (None: reported, skipped).
        align: ``none``, ``ecc`` or ``homography`` (recorded in run.json).
        threshold: threshold policy (default: from the batch's own scores).
        config: the command's resolved settings, recorded in run.json (``--config``).

    Raises:
        ValueError: a method that takes no reference image, an unknown alignment, no pair.
    """
    if align not in ALIGN_METHODS:
        raise ValueError(f"unknown alignment {align!r}; expected one of {', '.join(ALIGN_METHODS)}")
    if not pairs:
        raise ValueError("no pair to inspect")
    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    spec = threshold or PairsThreshold()
    detector = make_detector()
    if not detector.uses_normal_images:
        raise ValueError(
            f"{detector.name} takes no reference image (zero-shot or batch method); for pairs use "
            "refdiff (default), patchcore, mvg, winclip or adaptclip"
        )
    images = [Path(s.image_path) for s in pairs]
    names = _unique_names(images)
    listing = "\n".join(
        f"{display_path(s.image_path)}\t{display_path(s.reference_path or '')}" for s in pairs
    )
    settings = {
        "detector": detector.config(),
        "align": align,
        "pairs_sha1": hashlib.sha1(listing.encode()).hexdigest(),
        "num_pairs": len(pairs),
    }
    scored_path, run_json = out / "scored.jsonl", out / "run.json"
    done: dict[str, dict[str, Any]] = {}
    if resume and scored_path.exists() and run_json.exists():
        prev = json.loads(run_json.read_text(encoding="utf-8"))
        if prev.get("settings") == json.loads(json.dumps(settings)):
            for line in scored_path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if (out / row["map"]).is_file():
                    done[row["path"]] = row
    atomic_write_text(scored_path, "".join(json.dumps(r) + "\n" for r in done.values()))
    atomic_write_json(run_json, {"settings": settings, "status": "scoring"})

    errors: list[dict[str, str]] = []
    bar = tqdm(total=len(pairs), desc="pairs", unit="pair", disable=not progress)
    with open(scored_path, "a", encoding="utf-8") as fj:
        for s, name in zip(pairs, names):
            key = display_path(s.image_path)
            bar.update(1)
            if key in done:
                continue
            im = _read(s.image_path, "image", errors, key)
            if im is None:
                continue
            ref = _read(s.reference_path, "reference", errors, key)
            if ref is None:
                continue
            tb = time.perf_counter()
            score, amap, info = _score_pair(detector, im, ref, align, category)
            rel = f"maps/{name}.npy"
            tmp = out / f"{rel}.tmp.npy"
            np.save(tmp, _small(amap))
            os.replace(tmp, out / rel)
            row = {
                "path": key,
                "reference": display_path(s.reference_path or ""),
                "score": score,
                "map": rel,
                "seconds": time.perf_counter() - tb,
                **info,
            }
            done[key] = row
            fj.write(json.dumps(row) + "\n")
            fj.flush()
    bar.close()

    rows_scored = [done[display_path(p)] for p in images if display_path(p) in done]
    if not rows_scored:
        raise ValueError(
            "no pair could be scored (see errors): " + "; ".join(e["error"] for e in errors[:3])
        )
    if spec.fixed is not None:
        thr = fixed_threshold(spec.fixed, spec.pixel_fixed)
    elif spec.calibration:
        thr = _calibrate(make_detector(), spec, align, category)
    else:
        maps = np.concatenate(
            [np.load(out / r["map"]).astype(np.float32).ravel()[::7] for r in rows_scored]
        )
        thr = batch_robust_threshold(np.array([r["score"] for r in rows_scored]), maps)
    rows = _judge_and_write(out, images, names, rows_scored, thr, save_overlays, save_masks)
    meta = _run_meta(images, [p.reference_path for p in pairs if p.reference_path], None, config)
    _write_outputs(out, rows, errors, thr, detector, settings, title, names, images, meta)
    n_anom = sum(r["decision"] == "anomalous" for r in rows)
    return PredictSummary(out, len(rows), n_anom, len(errors), thr, time.perf_counter() - t0, rows)


def _judge_and_write(
    out: Path,
    images: list[Path],
    names: list[str],
    scored: list[dict[str, Any]],
    thr: Threshold,
    save_overlays: bool,
    save_masks: bool,
) -> list[dict[str, Any]]:
    """Decisions, masks and overlays at the final threshold (cheap: no detector call)."""
    name_of = {display_path(p): n for p, n in zip(images, names)}
    path_of = {display_path(p): p for p in images}
    (out / "overlays").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows = []
    for r in scored:
        im = load_image(path_of[r["path"]])
        h, w = im.shape[:2]
        amap = np.load(out / r["map"]).astype(np.float32)
        if amap.shape != (h, w):
            from anomalens.viz.overlay import resize_map

            amap = resize_map(amap, h, w)
        judged = judge_image(im, amap, r["score"], thr)
        targets = {}
        if save_overlays:
            targets["overlay"] = f"overlays/{name_of[r['path']]}_overlay.png"
        if save_masks:
            targets["mask"] = f"masks/{name_of[r['path']]}_mask.png"
        write_result_images(out, targets, im, judged, thr)
        rows.append(
            {
                "path": r["path"],
                "reference": r["reference"],
                "score": r["score"],
                "normalized_score": judged.normalized_score,
                "decision": judged.decision,
                "threshold": thr.value,
                "overlay": targets.get("overlay", ""),
                "mask": targets.get("mask", ""),
                "seconds": r["seconds"],
            }
        )
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows
