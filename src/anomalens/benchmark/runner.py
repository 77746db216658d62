"""The field's few-shot protocol as a resumable benchmark.

For every category, every k in ``shots`` and every seed, k normal images are drawn from the
category's ``train`` split (reproducibly from the seed), the detector is fitted on them and the
whole ``test`` split is scored. Each (category, k, seed) job writes one JSON file atomically under
``OUT/jobs/``; a rerun skips finished jobs, so a run killed midway loses at most the job in
progress. Summaries (mean ± std over seeds, category average) are rebuilt from the job files.

Beside the threshold-free metrics, every job evaluates the threshold ``anomalens predict``
would set without labels (leave-one-out on the k shots; a zero-shot method's default; the
batch-robust rule for batch methods): precision, recall, F1 and false-alarm rate at that
threshold, and per defect type the image AUROC and the recall. Per-image scores and decisions
go to ``OUT/scores/<category>/<job>.csv``.

With ``prompt_list`` the normal images are not drawn but read from prompt-list files
(:mod:`anomalens.data.prompt_lists`, the official MetaUAS protocol): a per-class list gives
each category its k prompts (any method that takes normal images), a per-query list gives each
test image its own prompt (methods with ``predict_pairs``: MetaUAS★). ``{seed}`` in the name
reads one file per seed; a name without it is one run per category (seed None). Each job
records the file, its sha256 and its kind; a rerun refuses a list whose content changed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from anomalens.benchmark.report import write_reports
from anomalens.data.io import ImageReadError, load_image, load_mask
from anomalens.data.prompt_lists import (
    SEED_FIELD,
    PromptList,
    check_prompt_list,
    class_prompts,
    pair_queries,
    prompt_list_file,
    read_prompt_list,
)
from anomalens.data.registry import get_index, list_categories
from anomalens.data.sampling import sample_shots
from anomalens.data.transforms import resize_mask
from anomalens.detectors.base import Detector
from anomalens.fileio import atomic_write_json, atomic_write_text
from anomalens.metrics import PixelMetricAccumulator, image_metrics
from anomalens.metrics.image import auroc
from anomalens.registry import create_detector, get_detector_class
from anomalens.thresholds import (
    Threshold,
    batch_robust_threshold,
    calibrate_leave_one_out,
    fixed_threshold,
)
from anomalens.types import Sample

__all__ = [
    "BenchmarkConfig",
    "evaluate_category",
    "no_label_threshold",
    "run_benchmark",
    "run_cell",
    "scores_path",
    "threshold_metrics",
]

log = logging.getLogger(__name__)


@dataclass
class BenchmarkConfig:
    """Settings of one benchmark run (written to ``OUT/config.json``).

    Attributes:
        method: registered detector name.
        dataset: ``mvtec``, ``visa``, ``btad``, ``mpdd`` or ``folder``.
        root: dataset root folder.
        categories: categories to run (None: all found under root).
        shots: k values; 0 = zero-shot (run once, seed ignored).
        seeds: seeds of the reference draws.
        draw_rule: ``without_replacement`` (default) or ``adaptclip`` (torch.randint, official).
        method_kwargs: options passed to the detector constructor.
        pixel_mode: ``exact`` or ``binned`` pixel metrics.
        batch_size: images per predict call.
        max_test_images: optional cap per category (quick runs; recorded in the results).
        prompt_list: prompt-list file(s) instead of the k-shot draw (see the module
            docstring): a path, or a name with ``{seed}`` (one file per seed). With it, k comes
            from the list (``shots`` and ``draw_rule`` are not used) and a name without
            ``{seed}`` runs each category once (``seeds`` not used).
    """

    method: str
    dataset: str
    root: str
    out: str
    categories: list[str] | None = None
    shots: list[int] = field(default_factory=lambda: [0, 1, 2, 4])
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30])
    draw_rule: str = "without_replacement"
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    pixel_mode: str = "exact"
    batch_size: int = 8
    max_test_images: int | None = None
    prompt_list: str | None = None


def _subsample(samples: list[Sample], n: int | None) -> list[Sample]:
    """A fixed, label-stratified subset (every j-th image of each label) for quick runs."""
    if n is None or len(samples) <= n:
        return samples
    idx = np.linspace(0, len(samples) - 1, n).round().astype(int)
    return [samples[i] for i in sorted(set(idx.tolist()))]


def evaluate_category(
    detector: Detector,
    test: Sequence[Sample],
    *,
    batch_size: int = 8,
    pixel_mode: str = "exact",
    progress: bool = False,
    desc: str = "test",
    paired: bool = False,
) -> dict[str, Any]:
    """Score a fitted detector on one category's test split and compute all metrics.

    Maps are compared at the detector's working size S; masks are resized with bilinear
    interpolation and binarised at 0.5 (evaluation.md §4). Unreadable files are skipped
    and listed under ``errors``; ``per_image`` lists path, label, defect type and score of
    every scored image.

    With ``paired``, each sample is scored against its own ``reference_path`` by the
    detector's ``predict_pairs`` (no ``fit`` needed; per-query prompt lists), and
    ``per_image`` also gives each image's ``prompt``.
    """
    pairs_fn = getattr(detector, "predict_pairs", None) if paired else None
    if paired and pairs_fn is None:
        raise ValueError(f"{detector.name} cannot score (image, prompt) pairs: no predict_pairs")
    size = detector.image_size
    acc = PixelMetricAccumulator(mode=pixel_mode)  # type: ignore[arg-type]  # checked there
    has_masks = any(s.mask_path is not None for s in test)
    scores: list[float] = []
    labels: list[int] = []
    per_image: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    predict_seconds = 0.0
    bar = tqdm(total=len(test), desc=desc, unit="img", disable=not progress, leave=False)
    for sl in detector.batch_slices(len(test), batch_size):
        chunk = test[sl]
        imgs, masks, labs, groups, paths, refs = [], [], [], [], [], []
        for s in chunk:
            try:
                im = load_image(s.image_path)
                mask = load_mask(s.mask_path, shape=im.shape[:2]) if s.mask_path else None
                if paired:
                    if s.reference_path is None:
                        errors.append({"path": str(s.image_path), "error": "no prompt"})
                        continue
                    refs.append(load_image(s.reference_path))
            except ImageReadError as exc:
                errors.append({"path": exc.path, "error": exc.reason})
                continue
            if mask is None:
                mask = np.zeros(im.shape[:2], dtype=bool)
            imgs.append(im)
            masks.append(resize_mask(mask, size))
            labs.append(int(s.label))
            groups.append(s.defect_type)
            paths.append((str(s.image_path), str(s.reference_path)))
        if imgs:
            t = time.perf_counter()
            if pairs_fn is not None:
                pred = pairs_fn(imgs, refs)
            else:
                pred = detector.predict(imgs, groups=groups)
            sc = pred.image_score.detach().float().cpu().numpy()
            # Maps on a GPU stay there: the exact pixel metrics run on the device (issue 16).
            amap = pred.anomaly_map.detach()
            mp = amap if amap.is_cuda else amap.float().cpu().numpy()
            predict_seconds += time.perf_counter() - t
            scores.extend(sc.tolist())
            labels.extend(labs)
            per_image.extend(
                {"path": p, "label": lab, "defect_type": g, "score": float(v)}
                | ({"prompt": ref} if paired else {})
                for (p, ref), lab, g, v in zip(paths, labs, groups, sc.tolist())
            )
            if has_masks:
                acc.update(mp, np.stack(masks))
        bar.update(len(chunk))
    bar.close()
    if not scores:
        raise ValueError("no test image of the category could be read")
    metrics: dict[str, Any] = image_metrics(np.asarray(scores), np.asarray(labels))
    if has_masks:
        metrics.update(acc.compute())
    metrics["num_test_images"] = len(scores)
    metrics["seconds_per_image"] = predict_seconds / len(scores)
    metrics["errors"] = errors
    metrics["per_image"] = per_image
    return metrics


def no_label_threshold(
    detector: Detector, shot_images: Sequence[np.ndarray], category: str | None
) -> tuple[Threshold | None, str]:
    """The threshold ``anomalens predict`` would set from the shots alone, or why there is none.

    With shots: leave-one-out (``calibrate_leave_one_out``, default percentile 100); the
    detector itself is the probe and is refitted, so fit it on all shots afterwards. Without:
    the method's default threshold when its scores are probabilities. Batch methods return
    (None, "batch"): their threshold comes from the scored test batch (see
    :func:`threshold_metrics`).

    Returns:
        (threshold or None, a note saying why there is none, "" otherwise).
    """
    if not shot_images:
        if detector.default_threshold is not None:
            thr = fixed_threshold(detector.default_threshold)
            thr.method = "default"
            return thr, ""
        if detector.scores_whole_batch:
            return None, "batch"
        return None, "no normal image and no default threshold (predict needs --threshold)"
    try:
        thr = calibrate_leave_one_out(lambda: detector, list(shot_images), category=category)
    except ValueError as exc:
        return None, str(exc)
    return thr, ""


def threshold_metrics(
    per_image: Sequence[dict[str, Any]], thr: Threshold | None, note: str = ""
) -> dict[str, Any]:
    """Precision, recall, F1 and false-alarm rate at a threshold, and per-defect-type metrics.

    Args:
        per_image: rows with ``score``, ``label`` (1 = defective) and ``defect_type``; each
            gets its ``decision`` at the threshold ("" without one).
        thr: the no-label threshold; None when there is none (then ``note`` says why), except
            ``note == "batch"``: the batch-robust threshold is set from these scores, as
            ``predict`` does for a batch method without normal images.

    Returns:
        ``threshold``, ``threshold_method``, ``threshold_note``, ``thr_precision``,
        ``thr_recall``, ``thr_f1``, ``thr_false_alarm_rate`` (NaN where undefined or without
        a threshold) and ``per_defect`` (type -> n, image_auroc, recall_at_threshold).
    """
    scores = np.asarray([r["score"] for r in per_image], dtype=np.float64)
    labels = np.asarray([r["label"] for r in per_image], dtype=bool)
    if thr is None and note == "batch" and scores.size >= 3:
        # only the image-level value is used here; the pixel rule is given the scores too
        thr = batch_robust_threshold(scores, scores[:, None, None])
        note = ""
    nan = float("nan")
    out: dict[str, Any] = {
        "threshold": thr.value if thr is not None else nan,
        "threshold_method": thr.method if thr is not None else "",
        "threshold_note": note,
    }
    pred = scores > thr.value if thr is not None else np.zeros_like(labels)
    for r, d in zip(per_image, pred.tolist()):
        r["decision"] = ("anomalous" if d else "normal") if thr is not None else ""
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    precision = tp / (tp + fp) if thr is not None and tp + fp else nan
    recall = tp / n_pos if thr is not None and n_pos else nan
    if thr is not None and math.isfinite(precision) and math.isfinite(recall):
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    elif thr is not None and n_pos and tp + fp == 0:
        f1 = 0.0  # nothing flagged: no true positive, F1 is 0 (precision undefined)
    else:
        f1 = nan
    out.update(
        thr_precision=precision,
        thr_recall=recall,
        thr_f1=f1,
        thr_false_alarm_rate=fp / n_neg if thr is not None and n_neg else nan,
    )
    types = sorted({r["defect_type"] for r in per_image if r["label"]})
    per_defect = {}
    for t in types:
        sel = np.asarray([(not r["label"]) or r["defect_type"] == t for r in per_image])
        is_t = labels & sel
        entry: dict[str, Any] = {"n": int(is_t.sum())}
        entry["image_auroc"] = (
            float(auroc(scores[sel], labels[sel].astype(np.int64))) if n_neg else nan
        )
        entry["recall_at_threshold"] = float(pred[is_t].mean()) if thr is not None else nan
        per_defect[t or "(unnamed)"] = entry
    out["per_defect"] = per_defect
    return out


def _write_scores(path: Path, per_image: Sequence[dict[str, Any]]) -> None:
    """Per-image scores and decisions of one job as CSV (atomically)."""
    buf = io.StringIO()
    fields = ["path", "label", "defect_type", "score", "decision"]
    if any("prompt" in r for r in per_image):
        fields.insert(1, "prompt")  # per-query prompt lists: each image's own prompt
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(per_image)
    atomic_write_text(path, buf.getvalue())


def scores_path(
    out: Path, category: str, k: int, seed: int | None, *, fixed_list: bool = False
) -> Path:
    """Where a job's per-image scores go: ``OUT/scores/<category>/<job>.csv``."""
    job = _job_path(out, category, k, seed, fixed_list=fixed_list)
    return out / "scores" / category / job.with_suffix(".csv").name


def _job_path(
    out: Path, category: str, k: int, seed: int | None, *, fixed_list: bool = False
) -> Path:
    """``OUT/jobs/<category>/<tag>.json``: ``k{k}_seed{seed}``, ``k{k}_zero`` without a seed
    (zero-shot, pairs) or ``k{k}_list`` for one prompt-list file without ``{seed}``."""
    if seed is not None:
        tag = f"k{k}_seed{seed}"
    else:
        tag = f"k{k}_list" if fixed_list else f"k{k}_zero"
    return out / "jobs" / category / f"{tag}.json"


def _cell_path(cfg: BenchmarkConfig, category: str, k: int, seed: int | None) -> Path:
    fixed = cfg.prompt_list is not None and SEED_FIELD not in cfg.prompt_list
    return _job_path(Path(cfg.out), category, k, seed, fixed_list=fixed)


def _list_seeds(cfg: BenchmarkConfig) -> list[int | None]:
    """The seeds of a prompt-list run: each seed's own file, or None for one fixed file."""
    assert cfg.prompt_list is not None
    return list(cfg.seeds) if SEED_FIELD in cfg.prompt_list else [None]


def _available_seeds(template: str) -> list[int]:
    """Seeds whose file exists for a ``{seed}`` template (for the error message)."""
    path = Path(template)
    head, _, tail = path.name.partition(SEED_FIELD)
    if SEED_FIELD in str(path.parent) or not path.parent.is_dir():
        return []
    found = []
    for p in path.parent.glob(f"{head}*{tail}"):
        middle = p.name[len(head) : len(p.name) - len(tail)]
        if middle.isdigit():
            found.append(int(middle))
    return sorted(found)


def _read_list(cfg: BenchmarkConfig, seed: int | None) -> PromptList:
    assert cfg.prompt_list is not None
    path = prompt_list_file(cfg.prompt_list, seed)
    if not path.is_file() and SEED_FIELD in cfg.prompt_list:
        have = _available_seeds(cfg.prompt_list)
        raise FileNotFoundError(
            f"prompt list {path} (seed {seed}, from {cfg.prompt_list}) does not exist; "
            + (
                f"files exist for seed(s) {' '.join(map(str, have))}: pass --seeds "
                + " ".join(map(str, have))
                if have
                else "no file of that name pattern exists"
            )
        )
    return read_prompt_list(path)


def _load_prompt_lists(cfg: BenchmarkConfig, categories: list[str]) -> dict[int | None, PromptList]:
    """Read every list of the run and check it against the dataset, before any work.

    Raises:
        ValueError: the method or dataset cannot use the lists, the lists are of mixed kinds,
            or a list does not fit the dataset (see ``check_prompt_list``).
        FileNotFoundError: a list file is missing (the seeds that have one are named).
    """
    if cfg.dataset == "pairs":
        raise ValueError(
            "--prompt-list does not apply to the pairs dataset: each test image already brings "
            "its own reference"
        )
    cls = get_detector_class(cfg.method)
    if not cls.uses_normal_images:
        raise ValueError(f"{cfg.method} takes no normal images: a prompt list does not apply to it")
    lists = {seed: _read_list(cfg, seed) for seed in _list_seeds(cfg)}
    kinds = {pl.kind for pl in lists.values()}
    if len(kinds) > 1:
        shown = ", ".join(f"{pl.path} ({pl.kind})" for pl in lists.values())
        raise ValueError(f"the prompt lists of one run must be of one kind; got {shown}")
    if "per_query" in kinds and not hasattr(cls, "predict_pairs"):
        raise ValueError(
            f"a per-query prompt list (each test image with its own prompt, MetaUAS*) needs a "
            f"method that scores explicit (image, prompt) pairs, such as metauas; "
            f"{cfg.method} has no predict_pairs. A per-class list works with every method that "
            "takes normal images"
        )
    tests = {
        cat: _subsample(get_index(cfg.dataset, cfg.root, cat, "test"), cfg.max_test_images)
        for cat in categories
    }
    for pl in lists.values():
        check_prompt_list(pl, cfg.root, tests)
    return lists


def _list_k(plist: PromptList, category: str) -> int:
    """Shots of a prompt-list cell: the category's listed prompts, or 1 prompt per query."""
    return len(plist.entries[category]) if plist.kind == "per_class" else 1


def _jobs(
    cfg: BenchmarkConfig,
    categories: list[str],
    detector: Detector,
    lists: dict[int | None, PromptList] | None = None,
) -> list[tuple]:
    if cfg.dataset == "pairs":  # each test image brings its own reference: one job per group
        return [(cat, 1, None) for cat in categories]
    if lists:  # the prompts come from the lists: k is what they list
        return [(cat, _list_k(pl, cat), seed) for cat in categories for seed, pl in lists.items()]
    jobs = []
    for cat in categories:
        for k in cfg.shots:
            if k == 0 and detector.needs_normal_images():
                log.warning("%s is few-shot only: k=0 skipped", cfg.method)
                continue
            if k > 0 and not detector.uses_normal_images:
                log.warning("%s is zero-shot only: k=%d skipped", cfg.method, k)
                continue
            for seed in [None] if k == 0 else cfg.seeds:
                jobs.append((cat, k, seed))
    return jobs


#: Settings that change a job's numbers; categories, shots, seeds and batch size may change
#: between runs into the same folder (finished jobs stay valid).
_RESULT_SETTINGS = ("method", "dataset", "draw_rule", "method_kwargs", "pixel_mode", "prompt_list")


def _check_same_settings(config_path: Path, cfg: BenchmarkConfig) -> None:
    """Refuse to resume into a folder whose finished jobs were made with other settings.

    Raises:
        ValueError: names the settings that differ from ``config_path``.
    """
    if not config_path.is_file():
        return
    prev = json.loads(config_path.read_text(encoding="utf-8"))
    new = json.loads(json.dumps(asdict(cfg)))
    diff = [k for k in _RESULT_SETTINGS if prev.get(k) != new[k]]
    if prev.get("max_test_images") != new["max_test_images"]:
        diff.append("max_test_images")
    if Path(prev.get("root", "")).resolve() != Path(cfg.root).resolve():
        diff.append("root")
    if diff:
        shown = "; ".join(f"{k}: {prev.get(k)!r} -> {new[k]!r}" for k in diff)
        raise ValueError(
            f"{config_path.parent} holds benchmark jobs made with other settings ({shown}); "
            "its finished jobs would be mixed with the new ones. Use another --out folder, "
            "or delete that folder to start over"
        )


def run_benchmark(
    cfg: BenchmarkConfig,
    *,
    progress: bool = True,
    run_cells: Callable[[BenchmarkConfig, list[tuple[str, int, int | None]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the benchmark and write ``OUT/results.{csv,json,md}``.

    Args:
        cfg: the run's settings.
        progress: show progress bars.
        run_cells: runs the unfinished (category, k, seed) cells elsewhere (each with
            :func:`run_cell`, e.g. ``anomalens.distributed.run_cells_on_ray``); default: here,
            one after the other.

    Returns:
        One flat row per finished (category, k, seed) job.
    """
    out = Path(cfg.out)
    available = list_categories(cfg.dataset, cfg.root)
    categories = cfg.categories or available
    unknown = [c for c in categories if c not in available]
    if unknown:
        raise ValueError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} under "
            f"{cfg.root} ({cfg.dataset} layout). Available: {', '.join(available) or '(none)'}"
        )
    _check_same_settings(out / "config.json", cfg)
    lists = _load_prompt_lists(cfg, categories) if cfg.prompt_list else None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", asdict(cfg))
    kwargs = dict(cfg.method_kwargs)
    if not ({"checkpoint", "backbone", "untrained"} & set(kwargs)):
        from anomalens.backbones.catalogue import default_checkpoint

        # official checkpoints: the one trained on the other dataset family (VisA for MVTec AD)
        other = default_checkpoint(cfg.method, cfg.dataset)
        if other is not None:
            kwargs["checkpoint"] = other
    detector = create_detector(cfg.method, **kwargs)
    jobs = _jobs(cfg, categories, detector, lists)
    pending = [j for j in jobs if not _cell_path(cfg, *j).exists()]
    if run_cells is not None and pending:
        run_cells(cfg, pending)  # e.g. one Ray task per cell; each writes its job file
    rows: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc=f"benchmark {cfg.method}", unit="job", disable=not progress)
    for cat, k, seed in bar:
        path = _cell_path(cfg, cat, k, seed)
        if path.exists():
            row = json.loads(path.read_text())
            if lists is not None:
                _check_same_list(path, row, lists[seed])
            rows.append(row)
            continue
        if run_cells is not None:
            raise RuntimeError(f"benchmark cell {cat} k={k} seed={seed} did not finish")
        bar.set_postfix_str(f"{cat} k={k} seed={seed}")
        rows.append(run_cell(cfg, detector, cat, k, seed, progress=progress))
    bar.close()
    write_reports(out, rows)
    return rows


def _check_same_list(job: Path, row: dict[str, Any], plist: PromptList) -> None:
    """Refuse a finished job whose prompt list had other content than the file has now."""
    if row.get("prompt_list_sha256") != plist.sha256:
        raise ValueError(
            f"{job} was made with prompt list {row.get('prompt_list')} of sha256 "
            f"{row.get('prompt_list_sha256')}, but {plist.path} now has sha256 {plist.sha256}; "
            "its finished jobs would be mixed with the new ones. Use another --out folder, or "
            "delete that folder to start over"
        )


def run_cell(
    cfg: BenchmarkConfig,
    detector: Detector,
    cat: str,
    k: int,
    seed: int | None,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Run one (category, k, seed) cell with ``detector`` and write its job and scores files.

    Returns:
        The cell's flat row (as stored in ``OUT/jobs/<category>/<job>.json``).
    """
    out = Path(cfg.out)
    path = _cell_path(cfg, cat, k, seed)
    test = _subsample(get_index(cfg.dataset, cfg.root, cat, "test"), cfg.max_test_images)
    plist: PromptList | None = None
    shots: list[Sample] = []
    if cfg.prompt_list is not None:
        plist = _read_list(cfg, seed)
        check_prompt_list(plist, cfg.root, {cat: test})
        if _list_k(plist, cat) != k:
            raise ValueError(
                f"prompt list {plist.path} gives {cat} {_list_k(plist, cat)} prompt(s), not k={k}"
            )
    if plist is not None and plist.kind == "per_query":  # each image with its own prompt
        fit_seconds = threshold_seconds = 0.0
        thr, note = None, "each image has its own prompt (per-query list): no k-shot threshold"
        metrics = evaluate_category(
            detector,
            pair_queries(plist, cfg.root, test),
            batch_size=cfg.batch_size,
            pixel_mode=cfg.pixel_mode,
            progress=progress,
            desc=f"{cat} pairs",
            paired=True,
        )
    elif cfg.dataset == "pairs":  # fitted on each test image's own reference
        from anomalens.benchmark.pairs import evaluate_pairs

        fit_seconds = threshold_seconds = 0.0
        thr, note = None, "each image has its own reference: no k-shot threshold"
        metrics = evaluate_pairs(
            detector, test, pixel_mode=cfg.pixel_mode, progress=progress, category=cat
        )
    else:
        if plist is not None:  # the listed prompts, not a draw
            shots = class_prompts(plist, cfg.root, cat)
        else:
            train = get_index(cfg.dataset, cfg.root, cat, "train") if k > 0 else []
            shots = (
                sample_shots(train, k, seed if seed is not None else 0, rule=cfg.draw_rule)
                if k
                else []
            )
        shot_images = [load_image(s.image_path) for s in shots]
        t0 = time.perf_counter()
        thr, note = no_label_threshold(detector, shot_images, cat)
        threshold_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        # the dataset's category names the object for methods whose prompts use it (WinCLIP)
        detector.fit(shot_images if shot_images else None, category=cat)
        fit_seconds = time.perf_counter() - t0
        metrics = evaluate_category(
            detector,
            test,
            batch_size=cfg.batch_size,
            pixel_mode=cfg.pixel_mode,
            progress=progress,
            desc=f"{cat} k={k}",
        )
    per_image = metrics.pop("per_image")
    metrics.update(threshold_metrics(per_image, thr, note))
    scores_file = out / "scores" / cat / path.with_suffix(".csv").name
    _write_scores(scores_file, per_image)  # before the job file that marks the job done
    row = {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "category": cat,
        "k": k,
        "seed": seed,
        "shots": [str(s.image_path) for s in shots],
        "fit_seconds": fit_seconds,
        "threshold_seconds": threshold_seconds,
        "scores_file": scores_file.relative_to(out).as_posix(),
        "detector": detector.config(),
        **metrics,
    }
    if plist is not None:  # which protocol made the numbers
        row.update(
            prompt_list=str(plist.path),
            prompt_list_sha256=plist.sha256,
            prompt_list_kind=plist.kind,
        )
    atomic_write_json(path, row)
    return row
