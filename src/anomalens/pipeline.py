"""Folder-to-results inference: scores, decisions, overlays, masks, CSV/JSONL and an HTML report.

``run_predict`` is what ``anomalens predict`` calls. It is resumable: results are appended to
``results.jsonl`` batch by batch, and a rerun with the same settings skips the images already
scored. Unreadable images are reported in ``errors.csv`` and skipped; the rest goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from anomalens._fileio import (
    _json_default,
    atomic_save_png,
    atomic_write_json,
    atomic_write_text,
)
from anomalens.data.io import ImageReadError, load_image
from anomalens.detectors.base import Detector
from anomalens.thresholds import (
    Threshold,
    batch_robust_threshold,
    calibrate_leave_one_out,
    calibrate_on_normals,
    fixed_threshold,
)
from anomalens.types import LearningType
from anomalens.viz.overlay import overlay, resize_map
from anomalens.viz.report_html import render_report

__all__ = [
    "PredictSummary",
    "ThresholdSpec",
    "load_images_reporting",
    "run_predict",
    "run_predict_groups",
    "split_by_group",
]

log = logging.getLogger(__name__)
RESULT_FIELDS = ("path", "score", "decision", "threshold", "overlay", "mask", "seconds")


@dataclass
class ThresholdSpec:
    """How to set the decision threshold.

    Attributes:
        fixed: a user-given image threshold (then ``pixel_fixed`` or the same value for masks).
        calibration: a folder's image paths of normal images to calibrate on.
        percentile: percentile of normal scores (default: 99 for a calibration folder, 100 = max
            for leave-one-out on the shots).
        margin: multiplier applied to the percentile value.
    """

    fixed: float | None = None
    pixel_fixed: float | None = None
    calibration: Sequence[Path] | None = None
    percentile: float | None = None
    margin: float = 1.0


@dataclass
class PredictSummary:
    out_dir: Path
    num_scored: int
    num_anomalous: int
    num_errors: int
    threshold: Threshold
    seconds: float
    rows: list[dict[str, Any]] = field(default_factory=list)


def load_images_reporting(
    paths: Sequence[Path], errors: list[dict[str, str]]
) -> list[tuple[Path, np.ndarray]]:
    """Read images; unreadable ones are appended to ``errors`` (path, error) and skipped."""
    out = []
    for p in paths:
        try:
            out.append((Path(p), load_image(p)))
        except ImageReadError as exc:
            log.warning("%s", exc)
            errors.append({"path": str(p), "error": exc.reason})
    return out


def _settings_key(detector: Detector, threshold: Threshold, images: Sequence[Path]) -> dict:
    """What must be equal for a rerun to resume: the detector, the threshold and the image list."""
    listing = "\n".join(sorted(str(p) for p in images)).encode()
    return {
        "detector": detector.config(),
        "threshold": threshold.to_dict(),
        "num_images": len(images),
        "images_sha1": hashlib.sha1(listing).hexdigest(),
    }


def _set_threshold(
    spec: ThresholdSpec,
    make_detector: Callable[[], Detector],
    detector: Detector,
    shots: list[np.ndarray],
    errors: list[dict[str, str]],
) -> Threshold | None:
    """The run's threshold, or None when it is derived from the scored batch itself."""
    if spec.fixed is not None:
        return fixed_threshold(spec.fixed, spec.pixel_fixed)
    if spec.calibration:
        normals = [im for _, im in load_images_reporting(spec.calibration, errors)]
        return calibrate_on_normals(
            detector, normals, percentile=spec.percentile or 99.0, margin=spec.margin
        )
    if not shots:
        if detector.default_threshold is not None:
            thr = fixed_threshold(detector.default_threshold)
            thr.method = "default"
            thr.details = {
                "source": f"{detector.name} scores are anomaly probabilities; 0.5 used because "
                "no normal image, calibration folder or --threshold was given"
            }
            return thr
        if detector.learning_type is LearningType.BATCH_ZERO_SHOT:
            return None  # batch-robust: set from the batch's own scores after scoring
        raise ValueError(
            "no way to set a threshold: give normal images (--normal, leave-one-out), "
            "a --calibration folder of normal images, or a fixed --threshold"
        )
    return calibrate_leave_one_out(
        make_detector, shots, percentile=spec.percentile or 100.0, margin=spec.margin
    )


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Output file names: the path below the images' common folder, ``/`` -> ``_``, no suffix.

    A flat folder gives the stems; ``good/000.png`` and ``crack/000.png`` give ``good_000`` and
    ``crack_000``. Names that still collide (same stem, other suffix) get ``__N``.
    """
    if not paths:
        return []
    parents = [str(p.parent.resolve()) for p in paths]
    base = Path(os.path.commonpath(parents))
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        rel = p.resolve().relative_to(base).with_suffix("")
        name = "_".join(rel.parts)
        n = seen.get(name, 0)
        seen[name] = n + 1
        names.append(name if n == 0 else f"{name}__{n}")
    return names


def run_predict(
    make_detector: Callable[[], Detector],
    image_paths: Sequence[Path],
    out_dir: str | Path,
    *,
    normal_paths: Sequence[Path] = (),
    threshold: ThresholdSpec | None = None,
    batch_size: int = 8,
    save_overlays: bool = True,
    save_masks: bool = True,
    resume: bool = True,
    progress: bool = True,
    title: str = "anomalens report",
) -> PredictSummary:
    """Fit on the normal images, score every image, write all outputs into ``out_dir``.

    Outputs: ``results.csv``, ``results.jsonl``, ``errors.csv``, ``run.json``, ``report.html``,
    ``overlays/*.png`` and ``masks/*.png``.

    Args:
        make_detector: builds a fresh detector with the run's settings (also used for
            leave-one-out threshold calibration).
        image_paths: images to inspect.
        normal_paths: the k normal images (a user's own k-shot folder); may be empty for
            zero-shot methods.
        threshold: threshold policy (default: leave-one-out on the shots).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threshold = threshold or ThresholdSpec()
    errors: list[dict[str, str]] = []

    detector = make_detector()
    shots = [im for _, im in load_images_reporting(list(normal_paths), errors)]
    if normal_paths and not shots:
        raise ValueError("none of the normal images could be read (see the messages above)")
    if detector.learning_type is LearningType.FEW_SHOT and not shots:
        raise ValueError(f"{detector.name} needs normal images: pass --normal DIR")
    detector.fit(shots if detector.learning_type is not LearningType.ZERO_SHOT else None)
    thr = _set_threshold(threshold, make_detector, detector, shots, errors)

    image_paths = [Path(p) for p in image_paths]
    if not image_paths:
        raise ValueError("no image to inspect")
    names = _unique_names(image_paths)
    precomputed: dict[Path, tuple[float, np.ndarray, float]] = {}
    if detector.learning_type is LearningType.BATCH_ZERO_SHOT:
        # batch methods score every image in one call (a result depends on the whole batch,
        # so a resumed run re-scores the whole batch too); without another threshold policy
        # the batch sets its own threshold
        n_err = len(errors)
        loaded_all = load_images_reporting(image_paths, errors)
        del errors[n_err:]  # reported once, when the images are read below
        if len(loaded_all) < 3:
            raise ValueError(f"{detector.name} needs a batch of at least 3 readable images")
        tb = time.perf_counter()
        all_scores, all_maps = detector.predict(
            [im for _, im in loaded_all], groups=[p.parent.name for p, _ in loaded_all]
        ).to_numpy()
        per = (time.perf_counter() - tb) / len(loaded_all)
        if thr is None:
            thr = batch_robust_threshold(all_scores, all_maps)
        precomputed = {
            p: (float(sc), mp, per) for (p, _), sc, mp in zip(loaded_all, all_scores, all_maps)
        }
    settings = _settings_key(detector, thr, image_paths)
    jsonl = out / "results.jsonl"
    run_json = out / "run.json"
    done: dict[str, dict[str, Any]] = {}
    if resume and jsonl.exists() and run_json.exists():
        prev = json.loads(run_json.read_text())
        if prev.get("settings") == json.loads(json.dumps(settings, default=_json_default)):
            for line in jsonl.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a killed run: recompute from there
                done[row["path"]] = row
            log.info("resuming: %d images already scored", len(done))
    if done:
        # rewrite the whole rows only, so a torn line is not glued to the next appended row
        atomic_write_text(jsonl, "".join(json.dumps(r) + "\n" for r in done.values()))
    elif jsonl.exists():
        jsonl.unlink()
    atomic_write_json(run_json, {"settings": settings, "status": "running"})
    (out / "overlays").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)

    todo = [(p, n) for p, n in zip(image_paths, names) if str(p) not in done]
    batch_method = detector.learning_type is LearningType.BATCH_ZERO_SHOT
    step = len(todo) if batch_method else batch_size
    bar = tqdm(total=len(todo), desc="inspect", unit="img", disable=not progress)
    with open(jsonl, "a", encoding="utf-8") as fj:
        for i in range(0, len(todo), max(step, 1)):
            chunk = todo[i : i + step]
            loaded = load_images_reporting([p for p, _ in chunk], errors)
            name_of = dict(chunk)
            if not loaded:
                bar.update(len(chunk))
                continue
            if all(p in precomputed for p, _ in loaded):
                scores = [precomputed[p][0] for p, _ in loaded]
                maps = [precomputed[p][1] for p, _ in loaded]
                per_image = precomputed[loaded[0][0]][2]
            else:
                tb = time.perf_counter()
                scores, maps = detector.predict(
                    [im for _, im in loaded], groups=[p.parent.name for p, _ in loaded]
                ).to_numpy()
                per_image = (time.perf_counter() - tb) / len(loaded)
            for (p, im), s, m in zip(loaded, scores, maps):
                name = name_of[p]
                h, w = im.shape[:2]
                full = resize_map(m, h, w)
                pix_thr = thr.pixel_value if thr.pixel_value is not None else thr.value
                pred_mask = full > pix_thr
                row = {
                    "path": str(p),
                    "score": float(s),
                    "decision": thr.decide(float(s)),
                    "threshold": thr.value,
                    "overlay": "",
                    "mask": "",
                    "seconds": per_image,
                }
                if save_overlays:
                    rel = f"overlays/{name}_overlay.png"
                    atomic_save_png(
                        out / rel, overlay(im, full, vis_range=thr.vis_range, mask=pred_mask)
                    )
                    row["overlay"] = rel
                if save_masks:
                    rel = f"masks/{name}_mask.png"
                    atomic_save_png(out / rel, pred_mask)
                    row["mask"] = rel
                done[str(p)] = row
                fj.write(json.dumps(row) + "\n")
            fj.flush()
            os.fsync(fj.fileno())
            bar.update(len(chunk))
    bar.close()

    rows = [done[str(p)] for p in image_paths if str(p) in done]
    _write_outputs(out, rows, errors, thr, detector, settings, title, names, image_paths)
    n_anom = sum(r["decision"] == "anomalous" for r in rows)
    return PredictSummary(out, len(rows), n_anom, len(errors), thr, time.perf_counter() - t0, rows)


def _link(path: Path, out: Path) -> str:
    """Link from the report folder to an image: relative when possible, else a file URI."""
    try:
        return os.path.relpath(path, out)
    except ValueError:  # another drive (Windows)
        return path.resolve().as_uri()


def _write_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    errors: list[dict[str, str]],
    thr: Threshold,
    detector: Detector,
    settings: dict[str, Any],
    title: str,
    names: list[str],
    image_paths: list[Path],
) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=("path", "error"))
    w.writeheader()
    w.writerows(errors)
    atomic_write_text(out / "errors.csv", buf.getvalue())
    name_of = {str(p): n for p, n in zip(image_paths, names)}
    cards = [
        {
            **r,
            "name": Path(r["path"]).name,
            "image": _link(Path(r["path"]), out),
            "id": name_of[r["path"]],
        }
        for r in rows
    ]
    info = {
        "method": detector.name,
        "normal images (k)": detector.num_shots,
        "threshold": f"{thr.value:.6g} ({thr.method})",
        "pixel threshold": f"{thr.pixel_value:.6g}" if thr.pixel_value is not None else "-",
        "threshold details": json.dumps(thr.details),
        "settings": json.dumps(detector.config()),
    }
    atomic_write_text(
        out / "report.html", render_report(cards, title=title, run_info=info, errors=errors)
    )
    atomic_write_json(
        out / "run.json",
        {
            "settings": settings,
            "status": "complete",
            "threshold": thr.to_dict(),
            "num_scored": len(rows),
            "num_errors": len(errors),
        },
    )


# ------------------------------------------------------------------------------ groups
def split_by_group(root: str | Path, paths: Sequence[Path]) -> dict[str, list[Path]]:
    """Paths keyed by their first sub-folder under ``root`` (the group), sorted by name.

    Raises:
        ValueError: a file lies directly in ``root`` (it belongs to no group).
    """
    root = Path(root).resolve()
    groups: dict[str, list[Path]] = {}
    loose = []
    for p in paths:
        rel = Path(p).resolve().relative_to(root)
        if len(rel.parts) < 2:
            loose.append(str(p))
            continue
        groups.setdefault(rel.parts[0], []).append(Path(p))
    if loose:
        raise ValueError(
            f"grouped run: {len(loose)} image(s) lie directly in {root}, not in a group "
            f"sub-folder (e.g. {loose[0]}); put each group's images in ROOT/<group>/"
        )
    return dict(sorted(groups.items()))


def run_predict_groups(
    make_detector: Callable[[], Detector],
    image_groups: dict[str, list[Path]],
    out_dir: str | Path,
    *,
    normal_groups: dict[str, list[Path]] | None = None,
    calibration_groups: dict[str, list[Path]] | None = None,
    threshold: ThresholdSpec | None = None,
    title: str = "anomalens report",
    **kwargs: Any,
) -> dict[str, PredictSummary]:
    """One memory and one threshold per group: :func:`run_predict` once per group.

    Each group's images are scored by a detector fitted on that group's normal images only
    (e.g. one product per sub-folder, no class name needed), with its own threshold, into
    ``out_dir/<group>/``. ``out_dir`` also gets ``results.csv`` (all groups, with a
    ``group`` column) and ``index.html`` (a line and a report link per group).

    Args:
        make_detector: builds a fresh detector with the run's settings.
        image_groups: group -> images to inspect (see :func:`split_by_group`).
        normal_groups: group -> normal images; every image group needs one (may be None for
            zero-shot methods).
        calibration_groups: group -> calibration images when the threshold policy uses a
            calibration folder; every image group needs one.
        threshold: threshold policy, applied per group.
        **kwargs: passed to :func:`run_predict` (batch_size, save_overlays, resume, ...).

    Raises:
        ValueError: an image group without normal (or calibration) images; nothing is
            computed then.
    """
    if not image_groups:
        raise ValueError("grouped run: no image group to inspect")
    threshold = threshold or ThresholdSpec()
    for what, given in (("normal", normal_groups), ("calibration", calibration_groups)):
        if given is None:
            continue
        missing = sorted(set(image_groups) - set(given))
        if missing:
            raise ValueError(
                f"grouped run: no {what} images for group(s) {', '.join(missing)} "
                f"({what} groups: {', '.join(sorted(given)) or 'none'})"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, PredictSummary] = {}
    for group, images in image_groups.items():
        spec = threshold
        if calibration_groups is not None:
            spec = dataclasses.replace(threshold, calibration=calibration_groups[group])
        summaries[group] = run_predict(
            make_detector,
            images,
            out / group,
            normal_paths=(normal_groups or {}).get(group, []),
            threshold=spec,
            title=f"{title} - {group}",
            **kwargs,
        )
    _write_group_outputs(out, summaries, title)
    return summaries


def _write_group_outputs(out: Path, summaries: dict[str, PredictSummary], title: str) -> None:
    import html

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=("group", *RESULT_FIELDS), extrasaction="ignore")
    w.writeheader()
    for group, s in summaries.items():
        for row in s.rows:
            row = dict(row, group=group)
            for key in ("overlay", "mask"):  # relative to out/, like the per-group files
                row[key] = f"{group}/{row[key]}" if row[key] else ""
            w.writerow(row)
    atomic_write_text(out / "results.csv", buf.getvalue())
    lines = [
        f"<tr><td><a href='{html.escape(g)}/report.html'>{html.escape(g)}</a></td>"
        f"<td>{s.num_scored}</td><td>{s.num_anomalous}</td><td>{s.num_errors}</td>"
        f"<td>{s.threshold.value:.6g} ({html.escape(s.threshold.method)})</td></tr>"
        for g, s in summaries.items()
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "td,th{padding:.3em .8em;text-align:left}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>One memory and one threshold per group.</p>"
        "<table><tr><th>group</th><th>scored</th><th>anomalous</th><th>unreadable</th>"
        f"<th>threshold</th></tr>{''.join(lines)}</table></body></html>"
    )
    atomic_write_text(out / "index.html", page)
