"""``anomalens predict --groups --engine ray``: the groups fitted and scored together on Ray.

Each group (one sub-folder of ``--images``, with its own normal images or its own model from
``anomalens fit --groups``) gets its own detector and threshold, as in
:func:`anomalens.pipeline.run_predict_groups`, and the same files: ``OUT/<group>/`` as a
single run's folder, plus ``OUT/results.csv`` (all groups, with a ``group`` column) and
``OUT/index.html``.

1. **Fit, one Ray task per group, in parallel** (at most ``workers`` at a time): the task fits
   the group's detector on its normal images (or loads the group's model), sets its threshold
   exactly as the local run does, and returns it as one self-contained ``.anomalens`` model
   (weights embedded) into Ray's object store, with what the driver records (settings, the
   unreadable normal images).
2. **Score, one shared actor pool for all groups**: one Ray Data pipeline over every group's
   images still to score, in group order. Each actor loads a group's model the first time it
   meets one of its images and keeps the ``models_per_worker`` most recently used, so a model
   is not loaded again per batch. A pool per group would start (and hold the CPUs or GPUs of)
   ``workers`` actors per group, or run the groups one after another, each paying the
   actors' start-up (tens of seconds); the shared pool keeps ``workers`` actors busy across
   groups of any size, and since the images come in group order an actor moves from one
   group to the next and rarely meets a group again.
3. The driver appends each row to its group's ``results.jsonl`` as it arrives and writes
   every group's outputs with the code of the local run. Resume is per group, as locally.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm.auto import tqdm

from anomalens.detectors.base import Detector
from anomalens.distributed.ray_predict import (
    _BATCH_REFUSAL,
    RayOptions,
    _connect,
    _model_bytes,
    _Scorer,
    require_ray,
)
from anomalens.pipeline import (
    PredictSummary,
    ThresholdSpec,
    _check_groups,
    _check_parquet,
    _close_parquet,
    _fit,
    _group_spec,
    _open_parquet,
    _resume_run,
    _run_meta,
    _set_threshold,
    _settings_key,
    _unique_names,
    _write_group_outputs,
    _write_outputs,
    display_path,
    load_model_for_predict,
    threshold_for_model,
    threshold_from_dict,
)
from anomalens.results_parquet import ParquetShards
from anomalens.thresholds import Threshold

__all__ = ["MODELS_PER_WORKER", "run_predict_groups_ray"]

log = logging.getLogger(__name__)

#: Group models an actor keeps loaded (least recently used dropped first). Images come in
#: group order, so an actor needs one model at a time and a second across a block boundary.
MODELS_PER_WORKER = 2


def _prepare_group(
    make_detector: Callable[[], Detector] | None,
    model: str | None,
    normal_paths: list[Path],
    spec: ThresholdSpec,
    category: str | None,
    device: str | None,
) -> tuple[bytes, dict[str, Any]]:
    """Ray task: fit (or load) one group's detector and set its threshold.

    Returns:
        The detector and threshold as ``.anomalens`` bytes (empty for a method that scores
        the whole batch, which is refused), and what the driver needs: name, shots, settings,
        threshold, the unreadable normal or calibration images.
    """
    errors: list[dict[str, str]] = []
    if model is not None:
        detector, saved = load_model_for_predict(model, device=device)
        thr = threshold_for_model(detector, saved, spec, errors, category)
    else:
        assert make_detector is not None
        detector, shots = _fit(make_detector, normal_paths, category, errors)
        thr = _set_threshold(spec, make_detector, detector, shots, errors, category)
    info = {
        "name": detector.name,
        "num_shots": detector.num_shots,
        "config": detector.config(),
        "scores_whole_batch": detector.scores_whole_batch,
        "threshold": None if thr is None else thr.to_dict(),
        "errors": errors,
    }
    if detector.scores_whole_batch or thr is None:
        return b"", info
    return _model_bytes(detector, thr), info


@dataclass
class _Fitted:
    """What the driver knows of a detector fitted on a worker: enough for run.json, the
    report's settings table and the resume key (``Detector.name``, ``num_shots``,
    ``config()``)."""

    name: str
    num_shots: int
    settings: dict[str, Any]

    def config(self) -> dict[str, Any]:
        return self.settings


@dataclass
class _Group:
    """One group's run on the driver: its inputs, detector, threshold and rows so far."""

    out: Path
    images: list[Path]
    names: list[str]
    title: str
    detector: Detector  # a _Fitted standing in
    thr: Threshold
    model: Any  # ObjectRef of the model bytes
    settings: dict[str, Any]
    meta: dict[str, Any]
    done: dict[str, dict[str, Any]]
    fit_errors: list[dict[str, str]]
    shards: ParquetShards | None
    errors: list[dict[str, str]] = field(default_factory=list)
    todo: list[tuple[Path, str]] = field(default_factory=list)


class _GroupScorer:
    """Ray Data actor for grouped runs: a :class:`_Scorer` per group met, each loaded once.

    Keeps the ``cache`` most recently used groups' scorers; batches may mix groups (at a
    group's end) and are split by group.
    """

    def __init__(
        self,
        models: dict[str, Any],
        thresholds: dict[str, dict[str, Any]],
        out: str,
        save_overlays: bool,
        save_masks: bool,
        device: str | None,
        cache: int,
    ) -> None:
        self.models = models
        self.thresholds = thresholds
        self.out = Path(out)
        self.save_overlays = save_overlays
        self.save_masks = save_masks
        self.device = device
        self.cache = max(1, cache)
        self.scorers: OrderedDict[str, _Scorer] = OrderedDict()

    def _scorer(self, group: str) -> _Scorer:
        scorer = self.scorers.pop(group, None)
        if scorer is None:
            while len(self.scorers) >= self.cache:
                self.scorers.popitem(last=False)  # the least recently used group
            scorer = _Scorer(
                [self.models[group]],
                self.thresholds[group],
                str(self.out / group),
                self.save_overlays,
                self.save_masks,
                self.device,
            )
        self.scorers[group] = scorer
        return scorer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        """``{"path", "name", "group"}`` -> ``{"record", "group"}`` (see ``_Scorer``)."""
        groups = [str(g) for g in batch["group"]]
        records: list[str] = []
        tags: list[str] = []
        for group in dict.fromkeys(groups):
            idx = [i for i, g in enumerate(groups) if g == group]
            part = {"path": batch["path"][idx], "name": batch["name"][idx]}
            got = self._scorer(group)(part)["record"]
            records += got
            tags += [group] * len(got)
        return {"record": records, "group": tags}


def run_predict_groups_ray(
    make_detector: Callable[[], Detector] | None,
    image_groups: dict[str, list[Path]],
    out_dir: str | Path,
    *,
    options: RayOptions | None = None,
    models: dict[str, Path] | None = None,
    normal_groups: dict[str, list[Path]] | None = None,
    calibration_groups: dict[str, list[Path]] | None = None,
    threshold: ThresholdSpec | None = None,
    title: str = "anomalens report",
    class_names: bool = False,
    category: str | None = None,
    batch_size: int = 8,
    save_overlays: bool = True,
    save_masks: bool = True,
    resume: bool = True,
    progress: bool = True,
    command: Sequence[str] | None = None,
    config: dict[str, Any] | None = None,
    parquet_rows: int | None = None,
    models_per_worker: int = MODELS_PER_WORKER,
) -> dict[str, PredictSummary]:
    """:func:`anomalens.pipeline.run_predict_groups` with fitting and scoring on Ray.

    Same arguments, outputs and resume rule as ``run_predict_groups`` (files equal to the
    local grouped run's up to times), plus ``options`` (cluster address, pool size) and
    ``models_per_worker`` (group models an actor keeps loaded). ``out_dir``, every image,
    normal image, calibration image and model, and the backbone weights (a path or the
    weight cache) must be reachable from every worker. A summary's ``seconds`` is the time
    of the whole grouped run (the groups run together).

    Raises:
        RuntimeError: Ray or (for ``parquet_rows``) pyarrow is not installed; a task failed
            after Ray's retries.
        ValueError: a group without normal images, calibration images or model (nothing is
            computed then); a method whose scores depend on the whole batch (MuSc); the
            errors of a local run (the group named).
    """
    ray = require_ray()
    options = options or RayOptions()
    _check_groups(image_groups, models, normal_groups, calibration_groups)
    _check_parquet(parquet_rows)
    if make_detector is None and models is None:
        raise ValueError("run_predict_groups_ray needs make_detector or models")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = threshold or ThresholdSpec()
    started = _connect(ray, options, progress)
    try:
        prepared = _prepare_on_ray(
            ray,
            options,
            make_detector,
            list(image_groups),
            models=models,
            normal_groups=normal_groups or {},
            specs={g: _group_spec(spec, calibration_groups, g) for g in image_groups},
            categories={g: g if class_names else category for g in image_groups},
        )
        runs = {}
        for group, (ref, info) in prepared.items():
            if info["scores_whole_batch"]:
                raise ValueError(_BATCH_REFUSAL.format(name=info["name"]))
            runs[group] = _open_group(
                out / group,
                image_groups[group],
                (normal_groups or {}).get(group, []),
                ref,
                info,
                f"{title} - {group}",
                options,
                command=command,
                config=config,
                resume=resume,
                save_overlays=save_overlays,
                save_masks=save_masks,
                parquet_rows=parquet_rows,
            )
        if any(r.todo for r in runs.values()):
            _score_groups_on_ray(
                ray,
                options,
                runs,
                out,
                batch_size=batch_size,
                save_overlays=save_overlays,
                save_masks=save_masks,
                progress=progress,
                models_per_worker=models_per_worker,
            )
    finally:
        if started:
            ray.shutdown()
    summaries = {g: _finish_group(r, t0) for g, r in runs.items()}
    _write_group_outputs(out, summaries, title)
    return summaries


def _prepare_on_ray(
    ray: Any,
    options: RayOptions,
    make_detector: Callable[[], Detector] | None,
    groups: list[str],
    *,
    models: dict[str, Path] | None,
    normal_groups: dict[str, list[Path]],
    specs: dict[str, ThresholdSpec],
    categories: dict[str, str | None],
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Fit (or load) every group as a Ray task, ``options.workers`` at a time.

    Returns:
        group -> (ObjectRef of the model bytes, the task's info), in the order of ``groups``.
    """
    remote = ray.remote(_prepare_group).options(
        num_returns=2,
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker,
        max_retries=3,
    )
    device = "cuda" if options.gpus_per_worker > 0 else None
    queue = list(groups)
    running: dict[Any, str] = {}  # info ref -> group
    blobs: dict[str, Any] = {}
    infos: dict[str, dict[str, Any]] = {}
    try:
        while queue or running:
            while queue and len(running) < options.workers:
                group = queue.pop(0)
                model = None if models is None else str(models[group])
                blob, info = remote.remote(
                    None if models is not None else make_detector,
                    model,
                    list(normal_groups.get(group, [])),
                    specs[group],
                    categories[group],
                    device,
                )
                blobs[group] = blob
                running[info] = group
            finished, _ = ray.wait(list(running), num_returns=1)
            group = running.pop(finished[0])
            infos[group] = _task_result(ray, finished[0], group)
    finally:
        for ref in running:  # a group failed: the others are not needed
            ray.cancel(ref)
    return {g: (blobs[g], infos[g]) for g in groups}


def _task_result(ray: Any, ref: Any, group: str) -> dict[str, Any]:
    """A fit task's info, or its error with the group named."""
    try:
        return cast(dict[str, Any], ray.get(ref))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, FileNotFoundError | ValueError | RuntimeError):
            raise type(cause)(f"group {group}: {cause}") from None
        raise RuntimeError(f"group {group}: {type(cause).__name__}: {cause}") from exc
    except ray.exceptions.RayError as exc:
        raise RuntimeError(f"group {group}: fitting failed on Ray: {exc}") from exc


def _open_group(
    out: Path,
    images: Sequence[Path],
    normals: Sequence[Path],
    model: Any,
    info: dict[str, Any],
    title: str,
    options: RayOptions,
    *,
    command: Sequence[str] | None,
    config: dict[str, Any] | None,
    resume: bool,
    save_overlays: bool,
    save_masks: bool,
    parquet_rows: int | None,
) -> _Group:
    """A group's run on the driver, resumed from its folder as a local run resumes."""
    thr = threshold_from_dict(info["threshold"])
    if thr is None:
        raise ValueError(f"{out.name}: no threshold could be set")
    paths = [Path(p) for p in images]
    if not paths:
        raise ValueError(f"{out.name}: no image to inspect")
    names = _unique_names(paths)
    detector = cast(Detector, _Fitted(info["name"], info["num_shots"], info["config"]))
    settings = _settings_key(detector, paths)
    meta = _run_meta(paths, list(normals), command, config)
    meta["engine"] = {"name": "ray", **asdict(options)}
    out.mkdir(parents=True, exist_ok=True)
    done = _resume_run(
        out, settings, thr, resume, meta, paths, names,
        save_overlays=save_overlays, save_masks=save_masks,
    )  # fmt: skip
    for sub in ("overlays", "masks", *(["maps"] if save_overlays or save_masks else [])):
        (out / sub).mkdir(exist_ok=True)
    return _Group(
        out=out,
        images=paths,
        names=names,
        title=title,
        detector=detector,
        thr=thr,
        model=model,
        settings=settings,
        meta=meta,
        done=done,
        fit_errors=list(info["errors"]),
        shards=_open_parquet(out, done, parquet_rows),
        todo=[(p, n) for p, n in zip(paths, names) if display_path(p) not in done],
    )


def _score_groups_on_ray(
    ray: Any,
    options: RayOptions,
    runs: dict[str, _Group],
    out: Path,
    *,
    batch_size: int,
    save_overlays: bool,
    save_masks: bool,
    progress: bool,
    models_per_worker: int,
) -> None:
    """Score every group's ``todo`` in one actor pool; append rows to each group's jsonl."""
    items = [
        {"path": os.fsencode(p), "name": n, "group": g}
        for g, run in runs.items()
        for p, n in run.todo
    ]
    blocks = max(1, min(len(items), options.workers * 4, -(-len(items) // batch_size)))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        _GroupScorer,
        fn_constructor_kwargs={
            "models": {g: r.model for g, r in runs.items() if r.todo},
            "thresholds": {g: r.thr.to_dict() for g, r in runs.items() if r.todo},
            "out": str(out.resolve()),
            "save_overlays": save_overlays,
            "save_masks": save_masks,
            "device": "cuda" if options.gpus_per_worker > 0 else None,
            "cache": models_per_worker,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.workers),
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker or None,
    )
    bar = tqdm(total=len(items), desc="inspect (ray, groups)", unit="img", disable=not progress)
    files: dict[str, Any] = {}
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            new: dict[str, list[dict[str, Any]]] = {}
            for text, tag in zip(batch["record"], batch["group"]):
                group = str(tag)
                run = runs[group]
                rec = json.loads(str(text))
                if "error" in rec:
                    if rec["error"] not in run.errors:
                        run.errors.append(rec["error"])
                    bar.update(1)
                    continue
                row = rec["row"]
                if row["path"] in run.done:  # a retried batch: keep the first copy
                    continue
                run.done[row["path"]] = row
                if group not in files:
                    files[group] = open(run.out / "results.jsonl", "a", encoding="utf-8")
                files[group].write(json.dumps(row) + "\n")
                new.setdefault(group, []).append(row)
                bar.update(1)
            for group, rows in new.items():
                files[group].flush()
                os.fsync(files[group].fileno())
                shards = runs[group].shards
                if shards is not None:
                    shards.add(rows)
    finally:
        for f in files.values():
            f.close()
        bar.close()


def _finish_group(run: _Group, t0: float) -> PredictSummary:
    """Write a group's results.csv, errors.csv, report.html, Parquet and finished run.json."""
    order = {display_path(p): i for i, p in enumerate(run.images)}
    run.errors.sort(key=lambda e: order.get(e["path"], len(order)))
    errors = run.fit_errors + run.errors  # as locally: fitting's unreadable files first
    _close_parquet(run.shards, run.meta)
    rows = [run.done[display_path(p)] for p in run.images if display_path(p) in run.done]
    _write_outputs(
        run.out,
        rows,
        errors,
        run.thr,
        run.detector,
        run.settings,
        run.title,
        run.names,
        run.images,
        run.meta,
    )
    n_anom = sum(r["decision"] == "anomalous" for r in rows)
    return PredictSummary(
        run.out, len(rows), n_anom, len(errors), run.thr, time.perf_counter() - t0, rows
    )
