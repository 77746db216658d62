"""Folder-to-results inference: scores, decisions, overlays, masks, CSV/JSONL and an HTML report.

``run_predict`` is what ``anomalens predict`` calls. It is resumable: results are appended to
``results.jsonl`` batch by batch, and a rerun with the same settings skips the images already
scored. The threshold is not part of those settings: a rerun that changes only the threshold
re-judges the stored scores and redraws overlays and masks from the stored anomaly maps
(``maps/*.npy``) without scoring any image again. Unreadable images are reported in
``errors.csv`` and skipped; the rest goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import platform
import shlex
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from anomalens.data.io import ImageReadError, load_image
from anomalens.detectors.base import Detector
from anomalens.fileio import (
    _json_default,
    atomic_save_png,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    spreadsheet_safe,
)
from anomalens.results import judge_image, normalized_score, score_scale, write_result_images
from anomalens.results_parquet import PARQUET_DIR, ParquetShards, require_pyarrow
from anomalens.thresholds import (
    Threshold,
    batch_robust_threshold,
    calibrate_leave_one_out,
    calibrate_on_normals,
    fixed_threshold,
)
from anomalens.viz.overlay import colorbar_rgb
from anomalens.viz.report_html import render_report

__all__ = [
    "FitSummary",
    "PredictSummary",
    "ThresholdSpec",
    "batch_threshold",
    "display_path",
    "file_problem",
    "fit_model",
    "fit_model_groups",
    "load_images_reporting",
    "load_model_for_predict",
    "run_predict",
    "run_predict_groups",
    "scored_batch",
    "split_by_group",
    "threshold_from_dict",
]

log = logging.getLogger(__name__)
RESULT_FIELDS = (
    "path",
    "score",
    "normalized_score",
    "decision",
    "threshold",
    "overlay",
    "mask",
    "seconds",
)
#: Suffixes a browser shows; other images (TIFF) get a PNG copy for the review page.
_WEB_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


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


#: Images are decoded at full size up to this short side; larger ones are reduced while
#: decoding (by an integer factor keeping both sides >= this), which bounds the memory a small
#: file of huge dimensions can take. Outputs (overlays, masks) are at the decoded size.
DECODE_SIDE = 2048


def load_images_reporting(
    paths: Sequence[Path], errors: list[dict[str, str]], working_size: int | None = DECODE_SIDE
) -> list[tuple[Path, np.ndarray]]:
    """Read images; unreadable ones are appended to ``errors`` (path, error) and skipped.

    Images whose sides both exceed twice ``working_size`` are reduced while decoding (see
    ``anomalens.data.io.load_image``); None decodes every image at full size.

    Entries that are not image files at all (dangling or looping symbolic links, folders or
    FIFOs named like images, files without read permission) are reported with that reason
    and never opened (a FIFO would block the run).
    """
    out = []
    for p in paths:
        reason = file_problem(p)
        if reason is not None:
            log.warning("%s: %s", display_path(p), reason)
            errors.append({"path": display_path(p), "error": reason})
            continue
        try:
            out.append((Path(p), load_image(p, working_size=working_size)))
        except ImageReadError as exc:
            log.warning("%s", exc)
            errors.append({"path": display_path(p), "error": exc.reason})
        except OSError as exc:  # e.g. removed or made unreadable between listing and reading
            reason = f"cannot read the file: {exc.strerror or exc}"
            log.warning("%s: %s", display_path(p), reason)
            errors.append({"path": display_path(p), "error": reason})
    return out


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as an image file, or None when it is a readable file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            return "dangling symbolic link (its target does not exist)"
        return "file not found"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if exc.errno == errno.EACCES:
            return "permission denied"
        return f"cannot read the file: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (FIFO, socket or device)"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def _settings_key(detector: Detector, images: Sequence[Path]) -> dict:
    """What must be equal for a rerun to reuse scores: the detector and the image list.

    The threshold is left out on purpose: a changed threshold re-judges the stored scores
    (see :func:`_rejudge`) instead of scoring again.
    """
    listing = "\n".join(sorted(display_path(p) for p in images)).encode()
    return {
        "detector": detector.config(),
        "num_images": len(images),
        "images_sha1": hashlib.sha1(listing).hexdigest(),
    }


def _input_checksum(paths: Sequence[Path]) -> str:
    """sha256 of the sorted input list (one path per line), to tell two runs' inputs apart."""
    listing = "\n".join(sorted(display_path(p) for p in paths)).encode()
    return hashlib.sha256(listing).hexdigest()


def _now() -> str:
    """UTC time as ISO 8601 with seconds (``2026-12-03T21:05:09Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _run_meta(
    image_paths: Sequence[Path],
    normal_paths: Sequence[Path],
    command: Sequence[str] | None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What run.json records about the run itself: version, time, command line, host, inputs.

    ``config``: the command's resolved settings (``anomalens.cli.main.resolved_config``).
    """
    from anomalens import __version__

    argv = [str(a) for a in (sys.argv if command is None else command)]
    main = Path(argv[0]) if argv else Path()
    if command is None and main.name == "__main__.py" and main.parent.name == "anomalens":
        argv[:1] = ["python", "-m", "anomalens"]  # what the user typed for ``python -m``
    return {
        "anomalens_version": __version__,
        "started": _now(),
        "finished": None,
        "command": shlex.join(argv),
        "argv": argv,
        "host": platform.node(),
        "python": platform.python_version(),
        "inputs": {
            "num_images": len(image_paths),
            "images_sha256": _input_checksum(image_paths),
            "num_normal_images": len(normal_paths),
            "normal_images_sha256": _input_checksum(normal_paths),
        },
        **({"config": config} if config is not None else {}),
    }


def _set_threshold(
    spec: ThresholdSpec,
    make_detector: Callable[[], Detector],
    detector: Detector,
    shots: list[np.ndarray],
    errors: list[dict[str, str]],
    category: str | None,
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
        if detector.scores_whole_batch:
            return None  # batch-robust: set from the batch's own scores after scoring
        raise ValueError(
            "no way to set a threshold: give normal images (--normal, leave-one-out), "
            "a --calibration folder of normal images, or a fixed --threshold"
        )
    return calibrate_leave_one_out(
        make_detector,
        shots,
        percentile=spec.percentile or 100.0,
        margin=spec.margin,
        category=category,
    )


#: Longest output file stem, in UTF-8 bytes (file systems allow 255 per name; suffixes follow).
MAX_NAME_BYTES = 120


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as text that can always be written (CSV, JSON, HTML).

    File names that are not valid UTF-8 reach Python as lone surrogates; their bytes are shown
    as ``\\xNN`` escapes instead of making the writers fail.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def _bounded(name: str) -> str:
    """``name`` made safe as a file stem: printable, at most ``MAX_NAME_BYTES``, unique by hash."""
    safe = "".join(c if c.isprintable() and c not in '\\/:*?"<>|' else "_" for c in name)
    if safe == name and len(name.encode("utf-8")) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    head = safe.encode("utf-8")[: MAX_NAME_BYTES - 11].decode("utf-8", "ignore")
    return f"{head}-{digest}"


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Output file names: the path below the images' common folder, ``/`` -> ``_``, no suffix.

    A flat folder gives the stems; ``good/000.png`` and ``crack/000.png`` give ``good_000`` and
    ``crack_000``. Names that still collide (same stem, other suffix) get ``__N``. Symbolic links
    are not followed (a link to an image elsewhere is named after the link); names that are
    too long or not printable are shortened and get a hash suffix, so every name is unique and
    fits the file system.
    """
    if not paths:
        return []
    absolute = [Path(os.path.abspath(p)) for p in paths]
    base = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    seen: dict[str, int] = {}
    names = []
    for p in absolute:
        rel = p.relative_to(base).with_suffix("")
        name = _bounded("_".join(rel.parts))
        n = seen.get(name, 0)
        seen[name] = n + 1
        names.append(name if n == 0 else f"{name}__{n}")
    return names


def _fit(
    make_detector: Callable[[], Detector],
    normal_paths: Sequence[Path],
    category: str | None,
    errors: list[dict[str, str]],
) -> tuple[Detector, list[np.ndarray]]:
    """Build the detector and fit it on the readable normal images."""
    detector = make_detector()
    shots = [im for _, im in load_images_reporting(list(normal_paths), errors)]
    if normal_paths and not shots:
        raise ValueError("none of the normal images could be read (see the messages above)")
    if detector.needs_normal_images() and not shots:
        raise ValueError(f"{detector.name} needs normal images: pass --normal DIR")
    detector.fit(shots if detector.uses_normal_images else None, category=category)
    return detector, shots


def _groups_of(paths: Sequence[Path]) -> list[str]:
    """Group label per image for batch methods' stratified subsets: its parent folder."""
    return [Path(p).parent.name for p in paths]


def scored_batch(paths: Sequence[Path]) -> dict[str, Any]:
    """Which images a batch method scored together (the readable ones, in order).

    Recorded in run.json as ``scored_batch``: a rerun reuses stored rows only when it scores
    the very same batch (a batch method's scores depend on every image of the batch).
    """
    listing = "\n".join(display_path(p) for p in paths).encode()
    return {"num_images": len(paths), "sha1": hashlib.sha1(listing).hexdigest()}


def batch_threshold(
    scores: np.ndarray, maps: np.ndarray | None = None, pixels: np.ndarray | None = None
) -> Threshold:
    """The batch-robust threshold of a scored batch, with the range of its normal scores.

    Args:
        scores: (N,) image scores of the batch.
        maps: (N, H, W) its anomaly maps, or ``pixels``: their values at
            ``anomalens.thresholds.pixel_sample_positions``.
    """
    thr = batch_robust_threshold(scores, maps, pixels=pixels)
    # the normalised score needs the range of the scores taken as normal: the batch's
    # scores at or below the threshold
    inliers = scores[scores <= thr.value]
    if inliers.size:
        thr.details.setdefault("normal_score_min", float(inliers.min()))
        thr.details.setdefault("normal_score_max", float(inliers.max()))
    return thr


def _score_whole_batch(
    detector: Detector, image_paths: Sequence[Path], thr: Threshold | None
) -> tuple[dict[str, tuple[float, np.ndarray, float]], Threshold, dict[str, Any]]:
    """Score all images in one call (batch methods); set the batch-robust threshold if needed.

    A result depends on the whole batch, so a resumed run re-scores the whole batch too.
    Unreadable images are reported later, when the images are read for writing.

    Returns:
        Score, map and seconds per image (key: display path), the threshold, and the
        :func:`scored_batch` record.
    """
    loaded = load_images_reporting(image_paths, [])
    if len(loaded) < max(detector.min_batch, 1):
        raise ValueError(
            f"{detector.name} needs a batch of at least {detector.min_batch} readable images, "
            f"got {len(loaded)}"
        )
    tb = time.perf_counter()
    scores, maps = detector.predict(
        [im for _, im in loaded], groups=_groups_of([p for p, _ in loaded])
    ).to_numpy()
    per = (time.perf_counter() - tb) / len(loaded)
    if thr is None:
        thr = batch_threshold(scores, maps)
    pre = {display_path(p): (float(s), m, per) for (p, _), s, m in zip(loaded, scores, maps)}
    return pre, thr, scored_batch([p for p, _ in loaded])


def _settings_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The settings that differ between two runs, as ``key: old -> new`` (nested keys dotted)."""
    new = json.loads(json.dumps(new, default=_json_default))
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.append(_settings_diff(a, b, f"{prefix}{key}."))
        else:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(d for d in diffs if d) or "unknown"


def _resume_run(
    out: Path,
    settings: dict[str, Any],
    thr: Threshold,
    resume: bool,
    meta: dict[str, Any],
    image_paths: Sequence[Path],
    names: Sequence[str],
    *,
    save_overlays: bool,
    save_masks: bool,
) -> dict[str, dict[str, Any]]:
    """:func:`_resume` for a run over ``image_paths`` (output ``names``): rows written with
    another threshold are re-judged into the same output files."""
    key_names = {display_path(p): n for p, n in zip(image_paths, names, strict=True)}
    return _resume(
        out,
        settings,
        thr,
        resume,
        meta,
        lambda rows: _rejudge(
            rows, thr, out, key_names, save_overlays=save_overlays, save_masks=save_masks
        ),
    )


def _resume(
    out: Path,
    settings: dict[str, Any],
    thr: Threshold,
    resume: bool,
    meta: dict[str, Any],
    rejudge: Callable[[dict[str, dict[str, Any]]], dict[str, dict[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """Rows already written by an earlier run with the same settings (key: path).

    When the earlier run used another threshold, its rows go through ``rejudge`` (new
    decisions, overlays and masks from the stored scores and maps) before they are reused.
    Rows of a batch method are reused only when the earlier run scored the same batch
    (``meta["scored_batch"]``, see :func:`scored_batch`).
    """
    jsonl = out / "results.jsonl"
    run_json = out / "run.json"
    done: dict[str, dict[str, Any]] = {}
    prev: dict[str, Any] = {}
    if resume and jsonl.exists() and run_json.exists():
        prev = json.loads(run_json.read_text())
        same = prev.get("settings") == json.loads(json.dumps(settings, default=_json_default))
        if same and prev.get("scored_batch") != meta.get("scored_batch"):
            log.warning(
                "%s holds results of another batch of images scored together (%s); they "
                "are recomputed",
                out,
                _settings_diff(
                    {"scored_batch": prev.get("scored_batch")},
                    {"scored_batch": meta.get("scored_batch")},
                ),
            )
            same = False
        if same:
            for line in jsonl.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a killed run: recompute from there
                done[row["path"]] = row
            log.info("resuming: %d images already scored", len(done))
        else:
            log.warning(
                "%s holds results made with other settings (%s); they are recomputed",
                out,
                _settings_diff(prev.get("settings") or {}, settings),
            )
    new_thr = json.loads(json.dumps(thr.to_dict(), default=_json_default))
    if done and prev.get("threshold") != new_thr:
        log.info("threshold changed: re-judging %d stored scores without re-scoring", len(done))
        done = rejudge(done)
    if done:
        # rewrite the whole rows only, so a torn line is not glued to the next appended row
        atomic_write_text(jsonl, "".join(json.dumps(r) + "\n" for r in done.values()))
    elif jsonl.exists():
        jsonl.unlink()
    atomic_write_json(
        run_json, {**meta, "settings": settings, "threshold": thr.to_dict(), "status": "running"}
    )
    return done


def _save_map(path: Path, anomaly_map: np.ndarray) -> None:
    """Store a (S, S) anomaly map as float32 ``.npy`` (atomically) for later re-judging."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(anomaly_map, dtype=np.float32), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _judge_and_write(
    out: Path,
    path: Path,
    name: str,
    image: np.ndarray,
    score: float,
    anomaly_map: np.ndarray,
    thr: Threshold,
    *,
    save_overlays: bool,
    save_masks: bool,
) -> dict[str, Any]:
    """Judge one scored image, write its result images and return its row (no ``seconds``)."""
    judged = judge_image(image, anomaly_map, float(score), thr)
    targets: dict[str, str] = {}
    if save_overlays:
        targets["overlay"] = f"overlays/{name}_overlay.png"
        targets["heat_layer"] = f"review/{name}_heat.png"
        targets["region_layer"] = f"review/{name}_region.png"
    if save_masks:
        targets["mask"] = f"masks/{name}_mask.png"
    write_result_images(out, targets, image, judged, thr)
    view = ""
    if save_overlays and Path(path).suffix.lower() not in _WEB_SUFFIXES:
        view = f"review/{name}_image.png"  # a browser cannot show e.g. TIFF: PNG copy
        atomic_save_png(out / view, image)
    return {
        "path": display_path(path),
        "score": judged.score,
        "normalized_score": judged.normalized_score,
        "decision": judged.decision,
        "threshold": thr.value,
        "overlay": targets.get("overlay", ""),
        "mask": targets.get("mask", ""),
        "heat_layer": targets.get("heat_layer", ""),
        "region_layer": targets.get("region_layer", ""),
        "view": view,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
    }


def _rejudge(
    done: dict[str, dict[str, Any]],
    thr: Threshold,
    out: Path,
    names: dict[str, str],
    *,
    save_overlays: bool,
    save_masks: bool,
) -> dict[str, dict[str, Any]]:
    """Judge stored rows against a new threshold without calling the detector.

    Decisions and normalised scores come from the stored scores; overlays and masks are redrawn
    from the stored maps (``maps/NAME.npy``) and the images as read. A row whose map is missing
    (or whose image can no longer be read, or which is not in this run's list) is dropped, so
    it is scored again.
    """
    kept: dict[str, dict[str, Any]] = {}
    need_images = save_overlays or save_masks
    for key, row in done.items():
        name = names.get(key)
        if name is None:
            continue
        if not need_images:
            # result images of the earlier judgement would be stale: no longer referenced
            stale = dict.fromkeys(("overlay", "mask", "heat_layer", "region_layer", "view"), "")
            kept[key] = {
                **row,
                **stale,
                "decision": thr.decide(float(row["score"])),
                "threshold": thr.value,
                "normalized_score": normalized_score(float(row["score"]), thr),
            }
            continue
        map_file = out / row.get("map", "")
        if not row.get("map") or not map_file.is_file():
            continue
        try:
            image = load_image(key)
            amap = np.load(map_file, allow_pickle=False)
        except (ImageReadError, OSError, ValueError) as exc:
            log.warning("%s: cannot re-judge (%s); it is scored again", key, exc)
            continue
        new = _judge_and_write(
            out,
            Path(key),
            name,
            image,
            float(row["score"]),
            amap,
            thr,
            save_overlays=save_overlays,
            save_masks=save_masks,
        )
        kept[key] = {**row, **new}
    return kept


def _score_and_write(
    detector: Detector,
    todo: list[tuple[Path, str]],
    thr: Threshold,
    out: Path,
    done: dict[str, dict[str, Any]],
    errors: list[dict[str, str]],
    precomputed: dict[str, tuple[float, np.ndarray, float]],
    *,
    batch_size: int,
    save_overlays: bool,
    save_masks: bool,
    progress: bool,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
) -> None:
    """Score ``todo`` in the detector's batches; append a row per image to results.jsonl.

    With overlays or masks requested, each map is also stored (``maps/NAME.npy``, float32 at
    the detector's working size) so that a changed threshold can redraw them without scoring.
    ``on_rows`` receives each batch's new rows once they are on disk (e.g. Parquet shards).
    """
    (out / "overlays").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    keep_maps = save_overlays or save_masks
    bar = tqdm(total=len(todo), desc="inspect", unit="img", disable=not progress)
    with open(out / "results.jsonl", "a", encoding="utf-8") as fj:
        for sl in detector.batch_slices(len(todo), batch_size):
            chunk = todo[sl]
            loaded = load_images_reporting([p for p, _ in chunk], errors)
            name_of = dict(chunk)
            if not loaded:
                bar.update(len(chunk))
                continue
            keys = [display_path(p) for p, _ in loaded]
            scores: Sequence[float] | np.ndarray
            maps: Sequence[np.ndarray] | np.ndarray
            if all(k in precomputed for k in keys):
                scores = [precomputed[k][0] for k in keys]
                maps = [precomputed[k][1] for k in keys]
                per_image = precomputed[keys[0]][2]
            else:
                tb = time.perf_counter()
                scores, maps = detector.predict(
                    [im for _, im in loaded], groups=_groups_of([p for p, _ in loaded])
                ).to_numpy()
                per_image = (time.perf_counter() - tb) / len(loaded)
            new = []
            for (p, im), key, s, m in zip(loaded, keys, scores, maps):
                row = _judge_and_write(
                    out,
                    p,
                    name_of[p],
                    im,
                    float(s),
                    m,
                    thr,
                    save_overlays=save_overlays,
                    save_masks=save_masks,
                )
                row["map"] = ""
                if keep_maps:
                    row["map"] = f"maps/{name_of[p]}.npy"
                    _save_map(out / row["map"], m)
                row["seconds"] = per_image
                done[key] = row
                new.append(row)
                fj.write(json.dumps(row) + "\n")
            fj.flush()
            os.fsync(fj.fileno())
            if on_rows is not None:
                on_rows(new)
            bar.update(len(chunk))
    bar.close()


def threshold_for_model(
    detector: Detector,
    model_threshold: Threshold | None,
    spec: ThresholdSpec,
    errors: list[dict[str, str]],
    category: str | None = None,
) -> Threshold | None:
    """The threshold of a run on an already fitted detector (a model file).

    The model's saved threshold, unless the run gives a fixed value or a calibration folder;
    a fixed image value alone keeps the model's calibrated pixel threshold for the masks.
    """
    if model_threshold is not None and spec.fixed is None and not spec.calibration:
        return model_threshold
    saved_pixel = model_threshold.pixel_value if model_threshold is not None else None
    if spec.fixed is not None and spec.pixel_fixed is None and saved_pixel is not None:
        # only the image threshold changes: masks keep the model's pixel threshold
        spec = replace(spec, pixel_fixed=saved_pixel)
    thr = _set_threshold(spec, lambda: detector, detector, [], errors, category)
    if (
        thr is not None
        and model_threshold is not None
        and spec.pixel_fixed is not None
        and spec.pixel_fixed == saved_pixel
    ):
        thr.details["pixel_source"] = f"model ({model_threshold.method})"
    return thr


def run_predict(
    make_detector: Callable[[], Detector] | None,
    image_paths: Sequence[Path],
    out_dir: str | Path,
    *,
    detector: Detector | None = None,
    model_threshold: Threshold | None = None,
    normal_paths: Sequence[Path] = (),
    threshold: ThresholdSpec | None = None,
    category: str | None = None,
    batch_size: int = 8,
    save_overlays: bool = True,
    save_masks: bool = True,
    resume: bool = True,
    progress: bool = True,
    title: str = "anomalens report",
    command: Sequence[str] | None = None,
    config: dict[str, Any] | None = None,
    parquet_rows: int | None = None,
) -> PredictSummary:
    """Fit on the normal images, score every image, write all outputs into ``out_dir``.

    Outputs: ``results.csv``, ``results.jsonl``, ``errors.csv``, ``run.json``, ``report.html``
    (the review page, see docs/review.md), ``overlays/*.png``, ``masks/*.png``, the page's
    layers and colour bar ``review/*.png``, and the anomaly maps ``maps/*.npy`` that let a
    changed threshold re-judge without scoring; with ``parquet_rows``, also the rows as
    Parquet shards ``results.parquet/part-NNNNN.parquet`` (see
    :mod:`anomalens.results_parquet`).

    Args:
        make_detector: builds a fresh detector with the run's settings (also used for
            leave-one-out threshold calibration); None when ``detector`` is given.
        image_paths: images to inspect.
        detector: an already fitted detector (e.g. from a model file): used as it is, no
            refit (``normal_paths`` must then be empty).
        model_threshold: the threshold saved with ``detector``; used unless ``threshold``
            gives a fixed value or a calibration folder.
        normal_paths: the k normal images (a user's own k-shot folder); may be empty for
            zero-shot methods.
        threshold: threshold policy (default: leave-one-out on the shots).
        category: object name given to ``fit`` (used by methods whose prompts name the
            object, e.g. WinCLIP; see ``Detector.uses_category``).
        command: the command line recorded in run.json (default: ``sys.argv``).
        config: the command's resolved settings, recorded in run.json (``--config``).
        parquet_rows: write the rows as Parquet shards of this many rows (None: no Parquet).
    """
    t0 = time.perf_counter()
    _check_parquet(parquet_rows)
    meta = _run_meta(list(image_paths), list(normal_paths), command, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    errors: list[dict[str, str]] = []
    spec = threshold or ThresholdSpec()
    if detector is not None:
        if normal_paths:
            raise ValueError("the detector is already fitted: give no normal images with it")
        thr = threshold_for_model(detector, model_threshold, spec, errors, category)
    elif make_detector is None:
        raise ValueError("run_predict needs make_detector or a fitted detector")
    else:
        detector, shots = _fit(make_detector, normal_paths, category, errors)
        thr = _set_threshold(spec, make_detector, detector, shots, errors, category)

    image_paths = [Path(p) for p in image_paths]
    if not image_paths:
        raise ValueError("no image to inspect")
    names = _unique_names(image_paths)
    precomputed: dict[str, tuple[float, np.ndarray, float]] = {}
    if detector.scores_whole_batch:
        precomputed, thr, meta["scored_batch"] = _score_whole_batch(detector, image_paths, thr)
    assert thr is not None  # only batch methods leave it to the batch
    settings = _settings_key(detector, image_paths)
    done = _resume_run(
        out, settings, thr, resume, meta, image_paths, names,
        save_overlays=save_overlays, save_masks=save_masks,
    )  # fmt: skip
    todo = [(p, n) for p, n in zip(image_paths, names) if display_path(p) not in done]
    shards = _open_parquet(out, done, parquet_rows)
    _score_and_write(
        detector,
        todo,
        thr,
        out,
        done,
        errors,
        precomputed,
        batch_size=batch_size,
        save_overlays=save_overlays,
        save_masks=save_masks,
        progress=progress,
        on_rows=None if shards is None else shards.add,
    )
    _close_parquet(shards, meta)
    rows = [done[display_path(p)] for p in image_paths if display_path(p) in done]
    _write_outputs(out, rows, errors, thr, detector, settings, title, names, image_paths, meta)
    n_anom = sum(r["decision"] == "anomalous" for r in rows)
    return PredictSummary(out, len(rows), n_anom, len(errors), thr, time.perf_counter() - t0, rows)


def _check_parquet(rows_per_shard: int | None) -> None:
    """Refuse a bad shard size or a missing pyarrow before anything is computed."""
    if rows_per_shard is None:
        return
    if rows_per_shard < 1:
        raise ValueError(f"--parquet-rows must be at least 1, got {rows_per_shard}")
    require_pyarrow()


def _open_parquet(
    out: Path, done: dict[str, dict[str, Any]], rows_per_shard: int | None
) -> ParquetShards | None:
    """The run's Parquet shards, resumed from the rows in ``done``; None without Parquet."""
    folder = out / PARQUET_DIR
    if rows_per_shard is None:
        if folder.exists():
            log.warning(
                "%s is left from an earlier run and not updated by this one (give --parquet "
                "to update it)",
                folder,
            )
        return None
    return ParquetShards(folder, done, rows_per_shard)


def _close_parquet(shards: ParquetShards | None, meta: dict[str, Any]) -> None:
    """Write the last shard; run.json records the shards (``parquet``)."""
    if shards is not None:
        shards.close()
        meta["parquet"] = shards.summary()


def _link(path: Path, out: Path) -> str:
    """Link from the report folder to an image: relative when possible, else a file URI."""
    try:
        return os.path.relpath(path, out)
    except ValueError:  # another drive (Windows)
        return path.resolve().as_uri()


def _settings_table(
    thr: Threshold, detector: Detector, meta: dict[str, Any], num_errors: int
) -> list[tuple[str, str]]:
    """The run's settings as (name, value) lines for the report's table."""
    lines = [
        ("method", detector.name),
        ("normal images (k)", str(detector.num_shots)),
        ("threshold", f"{thr.value:.6g} ({thr.method})"),
        ("pixel threshold (masks)", f"{thr.pixel_threshold:.6g}"),
    ]
    scale = score_scale(thr)
    lines.append(
        (
            "normalised score",
            f"(score - threshold) / ({scale[1]:.6g} - {scale[0]:.6g}) + 0.5, clipped to [0, 1]"
            if scale
            else "not available (the threshold records no range of normal scores)",
        )
    )
    for k, v in sorted(thr.details.items()):
        lines.append((f"threshold: {k}", v if isinstance(v, str) else json.dumps(v)))
    for k, v in sorted(detector.config().items()):
        lines.append((f"detector: {k}", v if isinstance(v, str) else json.dumps(v, default=str)))
    lines += [
        ("unreadable files", str(num_errors)),
        ("anomalens version", str(meta.get("anomalens_version"))),
        ("started (UTC)", str(meta.get("started"))),
        ("finished (UTC)", str(meta.get("finished"))),
        ("host", str(meta.get("host"))),
        ("command", str(meta.get("command"))),
        ("input list sha256", str(meta.get("inputs", {}).get("images_sha256"))),
    ]
    return lines


def _csv_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with text cells escaped for spreadsheets (file names can start with ``=``)."""
    return [{k: spreadsheet_safe(v) for k, v in r.items()} for r in rows]


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
    meta: dict[str, Any],
) -> None:
    """results.csv, errors.csv, the colour bar, report.html and the finished run.json."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(_csv_rows(rows))
    atomic_write_text(out / "results.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=("path", "error"))
    w.writeheader()
    w.writerows(_csv_rows(errors))
    atomic_write_text(out / "errors.csv", buf.getvalue())
    meta = {**meta, "finished": _now()}
    colorbar = ""
    if thr.vis_range is not None and any(r.get("overlay") for r in rows):
        colorbar = "review/colorbar.png"
        atomic_save_png(
            out / colorbar,
            colorbar_rgb(thr.vis_range, {"pixel threshold": thr.pixel_threshold}),
        )
    name_of = {display_path(p): n for p, n in zip(image_paths, names)}
    cards = [
        {
            **r,
            "name": Path(r["path"]).name,
            "image": r.get("view") or _link(Path(r["path"]), out),
            "id": name_of[r["path"]],
        }
        for r in rows
    ]
    atomic_write_text(
        out / "report.html",
        render_report(
            cards,
            title=title,
            settings=_settings_table(thr, detector, meta, len(errors)),
            threshold=thr.value,
            score_scale=score_scale(thr),
            vis_range=thr.vis_range,
            pixel_threshold=thr.pixel_threshold,
            colorbar=colorbar,
            errors=errors,
        ),
    )
    atomic_write_json(
        out / "run.json",
        {
            **meta,
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
    root = Path(os.path.abspath(root))
    groups: dict[str, list[Path]] = {}
    loose = []
    for p in paths:
        rel = Path(os.path.abspath(p)).relative_to(root)
        if len(rel.parts) < 2:
            loose.append(display_path(p))
            continue
        groups.setdefault(rel.parts[0], []).append(Path(p))
    if loose:
        raise ValueError(
            f"grouped run: {len(loose)} image(s) lie directly in {root}, not in a group "
            f"sub-folder (e.g. {loose[0]}); put each group's images in ROOT/<group>/"
        )
    return dict(sorted(groups.items()))


def run_predict_groups(
    make_detector: Callable[[], Detector] | None,
    image_groups: dict[str, list[Path]],
    out_dir: str | Path,
    *,
    models: dict[str, Path] | None = None,
    normal_groups: dict[str, list[Path]] | None = None,
    calibration_groups: dict[str, list[Path]] | None = None,
    threshold: ThresholdSpec | None = None,
    title: str = "anomalens report",
    class_names: bool = False,
    **kwargs: Any,
) -> dict[str, PredictSummary]:
    """One memory and one threshold per group: :func:`run_predict` once per group.

    Each group's images are scored by a detector fitted on that group's normal images only
    (e.g. one product per sub-folder, no class name needed), with its own threshold, into
    ``out_dir/<group>/``. ``out_dir`` also gets ``results.csv`` (all groups, with a
    ``group`` column) and ``index.html`` (a line and a report link per group).

    Args:
        make_detector: builds a fresh detector with the run's settings (None with ``models``).
        image_groups: group -> images to inspect (see :func:`split_by_group`).
        models: group -> fitted model file (``fit_model_groups``): each group is scored by
            its own saved detector and threshold, no refit; every image group needs one.
        normal_groups: group -> normal images; every image group needs one (may be None for
            zero-shot methods).
        calibration_groups: group -> calibration images when the threshold policy uses a
            calibration folder; every image group needs one.
        threshold: threshold policy, applied per group.
        class_names: give each group's folder name to ``fit`` as the object name (for methods
            whose prompts name the object, e.g. WinCLIP); off by default, since folder names
            are often not object words.
        **kwargs: passed to :func:`run_predict` (batch_size, save_overlays, resume, ...).

    Raises:
        ValueError: an image group without normal (or calibration) images; nothing is
            computed then.
    """
    _check_groups(image_groups, models, normal_groups, calibration_groups)
    _check_parquet(kwargs.get("parquet_rows"))
    threshold = threshold or ThresholdSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, PredictSummary] = {}
    for group, images in image_groups.items():
        spec = _group_spec(threshold, calibration_groups, group)
        fitted: dict[str, Any] = {}
        if models is not None:
            fitted["detector"], fitted["model_threshold"] = load_model_for_predict(models[group])
        summaries[group] = run_predict(
            make_detector,
            images,
            out / group,
            **fitted,
            normal_paths=(normal_groups or {}).get(group, []),
            threshold=spec,
            title=f"{title} - {group}",
            **({**kwargs, "category": group} if class_names else kwargs),
        )
    _write_group_outputs(out, summaries, title)
    return summaries


def _check_groups(
    image_groups: dict[str, list[Path]],
    models: dict[str, Path] | None,
    normal_groups: dict[str, list[Path]] | None,
    calibration_groups: dict[str, list[Path]] | None,
) -> None:
    """Refuse a grouped run with no group, or a group without its normal images, model or
    calibration images (before anything is computed)."""
    if not image_groups:
        raise ValueError("grouped run: no image group to inspect")
    for what, given in (
        ("normal images", normal_groups),
        ("calibration images", calibration_groups),
        ("model", models),
    ):
        if given is None:
            continue
        missing = sorted(set(image_groups) - set(given))
        if missing:
            raise ValueError(
                f"grouped run: no {what} for group(s) {', '.join(missing)} "
                f"({what.split()[0]} groups: {', '.join(sorted(given)) or 'none'})"
            )


def _group_spec(
    threshold: ThresholdSpec, calibration_groups: dict[str, list[Path]] | None, group: str
) -> ThresholdSpec:
    """A group's threshold policy: the run's, with the group's own calibration images."""
    if calibration_groups is None:
        return threshold
    return dataclasses.replace(threshold, calibration=calibration_groups[group])


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
            w.writerow({k: spreadsheet_safe(v) for k, v in row.items()})
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


# ----------------------------------------------------------------------------- model files
@dataclass
class FitSummary:
    """What ``fit_model`` wrote: the model path, its threshold and the unreadable files."""

    path: Path
    threshold: Threshold | None
    num_shots: int
    errors: list[dict[str, str]]
    seconds: float


def threshold_from_dict(d: dict[str, Any] | None) -> Threshold | None:
    """A :class:`Threshold` from its ``to_dict()`` form (as saved in a model file)."""
    if d is None:
        return None
    vis = d.get("vis_range")
    return Threshold(
        value=float(d["value"]),
        pixel_value=None if d.get("pixel_value") is None else float(d["pixel_value"]),
        method=str(d["method"]),
        details=dict(d.get("details") or {}),
        vis_range=None if vis is None else (float(vis[0]), float(vis[1])),
    )


def load_model_for_predict(
    path: str | os.PathLike[str], device: str | None = None
) -> tuple[Detector, Threshold | None]:
    """The fitted detector and saved threshold of a model folder or ``.anomalens`` file."""
    from anomalens.model_file import load_model

    saved = load_model(path, device=device)
    return saved.detector, threshold_from_dict(saved.threshold)


def fit_model(
    make_detector: Callable[[], Detector],
    normal_paths: Sequence[Path],
    out: str | Path,
    *,
    threshold: ThresholdSpec | None = None,
    category: str | None = None,
    embed_weights: bool = False,
) -> FitSummary:
    """Fit once and save: the detector and its threshold as a model (``anomalens fit``).

    The threshold is set as ``run_predict`` sets it (leave-one-out on the normal images by
    default, a calibration folder, a fixed value, or the method's default); batch methods
    without one save none (it is then set from each scored batch).

    Args:
        make_detector: builds a fresh detector (also used for leave-one-out).
        normal_paths: the k normal images (may be empty for zero-shot methods).
        out: model folder, or a ``.anomalens`` file.
        threshold: threshold policy.
        category: object name given to ``fit``.
        embed_weights: store the backbone weights in the model (self-contained).
    """
    t0 = time.perf_counter()
    errors: list[dict[str, str]] = []
    detector, shots = _fit(make_detector, normal_paths, category, errors)
    thr = _set_threshold(
        threshold or ThresholdSpec(), make_detector, detector, shots, errors, category
    )
    path = detector.save(out, threshold=thr, embed_weights=embed_weights)
    return FitSummary(Path(path), thr, detector.num_shots, errors, time.perf_counter() - t0)


def fit_model_groups(
    make_detector: Callable[[], Detector],
    normal_groups: dict[str, list[Path]],
    out: str | Path,
    *,
    calibration_groups: dict[str, list[Path]] | None = None,
    threshold: ThresholdSpec | None = None,
    class_names: bool = False,
    category: str | None = None,
    embed_weights: bool = False,
) -> dict[str, FitSummary]:
    """One model per group (``out/<group>/``), each fitted on that group's normal images.

    Raises:
        ValueError: no group, or a group without calibration images when the policy needs
            them; nothing is fitted then.
    """
    if not normal_groups:
        raise ValueError("grouped fit: no group of normal images")
    threshold = threshold or ThresholdSpec()
    if calibration_groups is not None:
        missing = sorted(set(normal_groups) - set(calibration_groups))
        if missing:
            raise ValueError(
                f"grouped fit: no calibration images for group(s) {', '.join(missing)}"
            )
    out = Path(out)
    summaries = {}
    for group, normals in normal_groups.items():
        spec = _group_spec(threshold, calibration_groups, group)
        summaries[group] = fit_model(
            make_detector,
            normals,
            out / group,
            threshold=spec,
            category=group if class_names else category,
            embed_weights=embed_weights,
        )
    return summaries
