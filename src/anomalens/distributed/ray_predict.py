"""``anomalens predict --engine ray``: one fitted model, many Ray workers, the usual outputs.

The driver fits the detector once (or loads it from a model file), sets the threshold exactly
as the single-process run does, saves detector and threshold as one self-contained
``.anomalens`` model (backbone weights embedded) and puts its bytes into Ray's object store. A
Ray Data pipeline over the images still to score feeds batches to an actor pool: each actor
loads the model once, reads its images, scores them, judges them and writes their overlays,
masks and maps into the output folder (which every worker must be able to write, e.g. a shared
file system). The driver streams the rows back, appends each to ``results.jsonl`` as it arrives
(fsync per batch) and finally writes ``results.csv``, ``errors.csv``, ``report.html`` and
``run.json`` with the same code as :func:`anomalens.pipeline.run_predict`.

Failure behaviour: an actor that dies is restarted by Ray and its batch retried (Ray Data's
defaults for actor pools); a row that arrives twice is kept once. A driver that dies leaves
``results.jsonl`` with every row received so far, and the same command resumes from there.

MuSc, which scores every image against the whole input set, takes another route: its mutual
scoring is cut into shards and block pairs (:mod:`anomalens.distributed.ray_musc`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
from tqdm.auto import tqdm

from anomalens.detectors.base import Detector
from anomalens.pipeline import (
    PredictSummary,
    ThresholdSpec,
    _check_parquet,
    _close_parquet,
    _fit,
    _groups_of,
    _judge_and_write,
    _open_parquet,
    _resume_run,
    _run_meta,
    _save_map,
    _set_threshold,
    _settings_key,
    _unique_names,
    _write_outputs,
    display_path,
    load_images_reporting,
    threshold_for_model,
    threshold_from_dict,
)
from anomalens.thresholds import Threshold

if TYPE_CHECKING:
    from anomalens.detectors.musc import MuSc

__all__ = ["RayOptions", "read_manifest", "require_ray", "run_predict_ray"]

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "anomalens[ray]"'


@dataclass
class RayOptions:
    """Where and how wide to run.

    Attributes:
        address: ``None`` starts a private Ray instance on this machine for the run (stopped
            afterwards); ``"auto"`` joins the cluster this machine belongs to; ``HOST:PORT``
            (or ``ray://HOST:PORT``) joins that cluster's head.
        workers: actors in the scoring pool (each loads the model once).
        gpus_per_worker: GPUs per actor; above 0 the actors run the detector on ``cuda``.
        cpus_per_worker: CPUs reserved per actor (torch uses as many threads).
        shard_size: MuSc only: images per shard of its mutual scoring (None: two shards per
            worker; see docs/scale.md for the memory a shard takes).
    """

    address: str | None = None
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    shard_size: int | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")


def require_ray() -> Any:
    """The ``ray`` module (with Ray Data), or an error that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RuntimeError(
            f"--engine ray needs Ray with Ray Data, which is not installed: {INSTALL_HINT} "
            "(or pip install 'ray[data]>=2.40')"
        ) from exc
    return ray


def read_manifest(path: str | os.PathLike[str]) -> list[Path]:
    """Image paths from a manifest: one path per line; blank lines and ``#`` comments skipped.

    Relative paths are taken from the manifest's folder. The files are not opened here: a
    missing or unreadable one is reported in ``errors.csv`` by the worker that meets it.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: the manifest is not UTF-8 text or lists no path.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest {p}: file not found")
    try:
        text = p.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise ValueError(f"manifest {p}: cannot read it ({exc.strerror or exc})") from exc
    if "\x00" in text:
        raise ValueError(f"manifest {p}: not a text file (one image path per line expected)")
    base = p.parent
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        q = Path(line)
        out.append(q if q.is_absolute() else base / q)
    if not out:
        raise ValueError(f"manifest {p}: no image path in it (one path per line expected)")
    return out


def _load_detector(model: list[Any], device: str | None) -> Detector:
    """The detector of a model file given as bytes, or as ``[ObjectRef]`` of its bytes."""
    import ray

    from anomalens.model_file import load_model

    blob = ray.get(model[0]) if isinstance(model[0], ray.ObjectRef) else model[0]
    with tempfile.TemporaryDirectory(prefix="anomalens-ray-") as tmp:
        path = Path(tmp) / "model.anomalens"
        path.write_bytes(blob)
        return load_model(path, device=device).detector


class _Scorer:
    """Ray Data actor: loads the model once, then scores, judges and writes each batch."""

    def __init__(
        self,
        model: list[Any],
        threshold: dict[str, Any],
        out: str,
        save_overlays: bool,
        save_masks: bool,
        device: str | None,
    ) -> None:
        self.detector = _load_detector(model, device)
        thr = threshold_from_dict(threshold)
        assert thr is not None
        self.thr: Threshold = thr
        self.out = Path(out)
        self.save_overlays = save_overlays
        self.save_masks = save_masks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        """Score one batch: ``{"path": bytes paths, "name": output names}`` -> one record each.

        Each record is JSON: ``{"row": ...}`` (a results row) or ``{"error": {path, error}}``.
        """
        paths = [Path(os.fsdecode(bytes(b))) for b in batch["path"]]
        name_of = dict(zip(paths, (str(n) for n in batch["name"])))
        errors: list[dict[str, str]] = []
        loaded = load_images_reporting(paths, errors)
        records = [json.dumps({"error": e}) for e in errors]
        if loaded:
            tb = time.perf_counter()
            scores, maps = self.detector.predict(
                [im for _, im in loaded], groups=_groups_of([p for p, _ in loaded])
            ).to_numpy()
            per_image = (time.perf_counter() - tb) / len(loaded)
            keep_maps = self.save_overlays or self.save_masks
            for (p, im), s, m in zip(loaded, scores, maps):
                row = _judge_and_write(
                    self.out,
                    p,
                    name_of[p],
                    im,
                    float(s),
                    m,
                    self.thr,
                    save_overlays=self.save_overlays,
                    save_masks=self.save_masks,
                )
                row["map"] = ""
                if keep_maps:
                    row["map"] = f"maps/{name_of[p]}.npy"
                    _save_map(self.out / row["map"], m)
                row["seconds"] = per_image
                records.append(json.dumps({"row": row}))
        return {"record": records}


def _connect(ray: Any, options: RayOptions, progress: bool) -> bool:
    """Join or start Ray; True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if options.address is None:
        # "local": a new instance even when another Ray cluster runs on this machine (a bare
        # ray.init() would join the one started last)
        kwargs["address"] = "local"
        need = int(np.ceil(options.workers * options.cpus_per_worker))
        kwargs["num_cpus"] = max(os.cpu_count() or 1, need)
        kwargs["include_dashboard"] = False
    else:
        kwargs["address"] = options.address
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    return True


def _model_bytes(detector: Detector, thr: Threshold | None) -> bytes:
    """The fitted detector and its threshold as one self-contained ``.anomalens`` file."""
    with tempfile.TemporaryDirectory(prefix="anomalens-ray-") as tmp:
        path = detector.save(Path(tmp) / "model.anomalens", threshold=thr, embed_weights=True)
        return Path(path).read_bytes()


def run_predict_ray(
    make_detector: Callable[[], Detector] | None,
    image_paths: Sequence[Path],
    out_dir: str | Path,
    *,
    options: RayOptions | None = None,
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
    """:func:`anomalens.pipeline.run_predict` with the scoring spread over Ray workers.

    Same arguments, outputs and resume rule as ``run_predict`` (the files are equal to a
    single-process run's up to times), plus ``options`` (cluster address and pool size).
    ``out_dir`` must be writable by every worker, and every image readable by every worker.
    MuSc scores the whole input set as one batch, in shards (see
    :mod:`anomalens.distributed.ray_musc`); ``batch_size`` does not apply to it.

    Raises:
        RuntimeError: Ray is not installed (the message says how to install it).
        ValueError: a method other than MuSc whose scores depend on the whole batch (or MuSc
            with image views): not distributed; or the same input errors as ``run_predict``.
    """
    ray = require_ray()
    options = options or RayOptions()
    _check_parquet(parquet_rows)
    t0 = time.perf_counter()
    meta = _run_meta(list(image_paths), list(normal_paths), command, config)
    meta["engine"] = {"name": "ray", **asdict(options)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    errors: list[dict[str, str]] = []
    spec = threshold or ThresholdSpec()
    if detector is not None:
        if normal_paths:
            raise ValueError("the detector is already fitted: give no normal images with it")
        _check_distributable(detector)
        thr = threshold_for_model(detector, model_threshold, spec, errors, category)
    elif make_detector is None:
        raise ValueError("run_predict_ray needs make_detector or a fitted detector")
    else:
        probe = make_detector()
        _check_distributable(probe)  # refuse before fitting anything
        detector, shots = _fit(lambda: probe, normal_paths, category, errors)
        thr = _set_threshold(spec, make_detector, detector, shots, errors, category)
    image_paths = [Path(p) for p in image_paths]
    if not image_paths:
        raise ValueError("no image to inspect")
    names = _unique_names(image_paths)
    settings = _settings_key(detector, image_paths)
    if _is_musc(detector):
        from anomalens.distributed.ray_musc import predict_musc_on_ray

        thr, done = predict_musc_on_ray(
            ray,
            options,
            detector,
            thr,
            image_paths,
            names,
            out,
            settings,
            meta,
            errors,
            resume=resume,
            save_overlays=save_overlays,
            save_masks=save_masks,
            progress=progress,
        )
        # every row is known now: the Parquet shards get those not in a kept shard
        _close_parquet(_open_parquet(out, done, parquet_rows), meta)
        return _finish(
            out, image_paths, names, done, errors, thr, detector, settings, title, meta, t0
        )
    if thr is None:
        raise ValueError("no threshold could be set for the run")
    done = _resume_run(
        out, settings, thr, resume, meta, image_paths, names,
        save_overlays=save_overlays, save_masks=save_masks,
    )  # fmt: skip
    todo = [(p, n) for p, n in zip(image_paths, names) if display_path(p) not in done]
    shards = _open_parquet(out, done, parquet_rows)
    if todo:
        _score_on_ray(
            ray,
            options,
            detector,
            thr,
            todo,
            out,
            done,
            errors,
            batch_size=batch_size,
            save_overlays=save_overlays,
            save_masks=save_masks,
            progress=progress,
            on_rows=None if shards is None else shards.add,
        )
    _close_parquet(shards, meta)
    return _finish(out, image_paths, names, done, errors, thr, detector, settings, title, meta, t0)


def _finish(
    out: Path,
    image_paths: list[Path],
    names: list[str],
    done: dict[str, dict[str, Any]],
    errors: list[dict[str, str]],
    thr: Threshold,
    detector: Detector,
    settings: dict[str, Any],
    title: str,
    meta: dict[str, Any],
    t0: float,
) -> PredictSummary:
    """Errors in input order, then results.csv, errors.csv, report.html and run.json."""
    order = {display_path(p): i for i, p in enumerate(image_paths)}
    errors.sort(key=lambda e: order.get(e["path"], len(order)))
    rows = [done[display_path(p)] for p in image_paths if display_path(p) in done]
    _write_outputs(out, rows, errors, thr, detector, settings, title, names, image_paths, meta)
    n_anom = sum(r["decision"] == "anomalous" for r in rows)
    return PredictSummary(out, len(rows), n_anom, len(errors), thr, time.perf_counter() - t0, rows)


def _is_musc(detector: Detector) -> TypeGuard[MuSc]:
    from anomalens.detectors.musc import MuSc  # not at import: it loads open_clip

    return isinstance(detector, MuSc)


# for --groups on Ray: a batch method is distributed for one MuSc run only
_BATCH_REFUSAL = (
    "{name} scores each image against the whole batch, which --engine ray distributes only for "
    "a single MuSc run, not with --groups: run one command per group, or without --engine ray"
)


def _check_distributable(detector: Detector) -> None:
    """Refuse a method whose scores depend on the whole batch, other than plain MuSc."""
    if detector.scores_whole_batch and not _is_musc(detector):
        raise ValueError(
            f"{detector.name} scores each image against the whole batch, which --engine ray "
            "distributes for MuSc only (and not with --resize / --roi / --tile views): run it "
            "without --engine ray"
        )


def _score_on_ray(
    ray: Any,
    options: RayOptions,
    detector: Detector,
    thr: Threshold,
    todo: list[tuple[Path, str]],
    out: Path,
    done: dict[str, dict[str, Any]],
    errors: list[dict[str, str]],
    *,
    batch_size: int,
    save_overlays: bool,
    save_masks: bool,
    progress: bool,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
) -> None:
    """Score ``todo`` in a Ray Data actor pool; append each new row to results.jsonl.

    ``on_rows`` receives each streamed batch's new rows once they are on disk.
    """
    (out / "overlays").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    if save_overlays or save_masks:
        (out / "maps").mkdir(exist_ok=True)
    blob = _model_bytes(detector, thr)
    started = _connect(ray, options, progress)
    try:
        ref = ray.put(blob)
        items = [{"path": os.fsencode(p), "name": n} for p, n in todo]
        # enough blocks for every actor to get work, not so many that scheduling dominates
        blocks = max(1, min(len(items), options.workers * 4, -(-len(items) // batch_size)))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            _Scorer,
            fn_constructor_kwargs={
                "model": [ref],
                "threshold": thr.to_dict(),
                "out": str(out.resolve()),
                "save_overlays": save_overlays,
                "save_masks": save_masks,
                "device": "cuda" if options.gpus_per_worker > 0 else None,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker or None,
        )
        bar = tqdm(total=len(todo), desc="inspect (ray)", unit="img", disable=not progress)
        with open(out / "results.jsonl", "a", encoding="utf-8") as fj:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                new = []
                for text in batch["record"]:
                    rec = json.loads(str(text))
                    if "error" in rec:
                        if rec["error"] not in errors:
                            errors.append(rec["error"])
                        bar.update(1)
                        continue
                    row = rec["row"]
                    if row["path"] in done:  # a retried batch: keep the first copy
                        continue
                    done[row["path"]] = row
                    new.append(row)
                    fj.write(json.dumps(row) + "\n")
                    bar.update(1)
                fj.flush()
                os.fsync(fj.fileno())
                if on_rows is not None:
                    on_rows(new)
        bar.close()
    finally:
        if started:
            ray.shutdown()
