"""``anomalens predict --method musc --engine ray``: MuSc's mutual scoring spread over Ray actors.

MuSc has nothing to fit: it scores the whole input set jointly. The batch is cut into shards
of consecutive images (``RayOptions.shard_size``) and scored by the stages of
:mod:`anomalens.distributed.musc_shards`; here they run on a pool of ``workers`` Ray actors,
each of which loads the model once (from the object store) and then takes shard after shard:

1. extract: every shard's tokens and embeddings into ``OUT/musc-work/features/``;
2. score: every shard's images against every shard (block decomposition, exact), into
   ``OUT/musc-work/scores/``;
3. the driver: RsCIN over all image scores, then the threshold (batch-robust from the scores
   and the sampled map pixels, unless ``--threshold`` / ``--calibration`` set one);
4. write: every shard's overlays, masks and maps; the driver appends the rows to
   ``results.jsonl`` as they arrive, and writes the other outputs as a local run does.

Failure and resume: an actor that dies is restarted by Ray (max 3 times) and its call
retried; shard files are written atomically, so a retried call finds either a whole file or
none. A killed driver leaves the finished shard files and the rows received; the same command
reuses the shard files made with the same settings (the scores only for the very same batch
of readable images) and keeps the rows of the same batch. The scratch folder is removed when
the run completes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from anomalens.detectors.musc import MuSc
from anomalens.distributed.musc_shards import (
    WORK_DIR,
    Runner,
    default_shard_size,
    remove_work,
    run_stage,
    score_shards,
    write_jobs,
)
from anomalens.distributed.ray_predict import RayOptions, _connect, _load_detector, _model_bytes
from anomalens.pipeline import _resume_run, batch_threshold
from anomalens.thresholds import Threshold

__all__ = ["predict_musc_on_ray"]

log = logging.getLogger(__name__)


class _MuscWorker:
    """Ray actor: loads the MuSc model once, then runs stage jobs of any shard."""

    def __init__(self, model: list[Any], device: str | None) -> None:
        detector = _load_detector(model, device)
        assert isinstance(detector, MuSc)
        self.detector = detector

    def run(self, stage: str, job: Any) -> Any:
        return run_stage(self.detector, stage, job)


@contextmanager
def _actor_pool(
    ray: Any, options: RayOptions, detector: MuSc, work: Path, progress: bool
) -> Iterator[Runner]:
    """A :data:`Runner` over ``options.workers`` MuSc actors (killed on exit)."""
    ref = ray.put(_model_bytes(detector, None))
    actor = ray.remote(
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker,
        max_restarts=3,
        max_task_retries=3,
    )(_MuscWorker)
    device = "cuda" if options.gpus_per_worker > 0 else None
    actors = [actor.remote([ref], device) for _ in range(options.workers)]

    def run(stage: str, jobs: list[Any], on_result: Callable[[int, Any], None] | None) -> list[Any]:
        results: list[Any] = [None] * len(jobs)
        queue = list(enumerate(jobs))
        idle = list(actors)
        running: dict[Any, tuple[int, Any]] = {}
        bar = tqdm(total=len(jobs), desc=f"MuSc {stage} (ray)", unit="shard", disable=not progress)
        while queue or running:
            while queue and idle:
                i, job = queue.pop(0)
                a = idle.pop()
                running[a.run.remote(stage, job)] = (i, a)
            finished, _ = ray.wait(list(running), num_returns=1)
            for done in finished:
                i, a = running.pop(done)
                idle.append(a)
                try:
                    results[i] = ray.get(done)
                except ray.exceptions.RayError as exc:
                    raise RuntimeError(
                        f"MuSc {stage} of shard {i} failed on Ray (finished shards are kept in "
                        f"{work}; the same command resumes): {exc}"
                    ) from exc
                if on_result is not None:
                    on_result(i, results[i])
                bar.update(1)
        bar.close()
        return results

    try:
        yield run
    finally:
        for a in actors:
            ray.kill(a)


def _shard_size(detector: MuSc, options: RayOptions, num_images: int) -> int:
    """The run's shard size; its per-worker memory logged, and checked against ``budget_gb``."""
    size = options.shard_size or default_shard_size(
        num_images, options.workers, detector.batch_size
    )
    size = min(size, max(1, num_images))
    biggest = -(-num_images // detector.divide_num)  # largest subset, about
    cost = detector.estimate_shard_cost(size, biggest)
    gib = cost["memory_bytes"] / 2**30
    log.info(
        "MuSc on Ray: %d images in shards of %d; per worker about %.2f GiB while scoring "
        "(plus the model); tokens of the batch %.2f GiB in %s, %.2f GiB read per shard",
        num_images,
        size,
        gib,
        cost["features_bytes"] / 2**30,
        WORK_DIR,
        cost["read_bytes"] / 2**30,
    )
    if detector.budget_gb is not None and gib > detector.budget_gb:
        advice = (
            f"MuSc on Ray: a worker would hold about {gib:.2f} GiB with shards of {size} "
            f"images, over budget_gb={detector.budget_gb:g}: give a smaller --shard-size"
        )
        if not detector.force:
            raise ValueError(advice)
        log.warning("%s (running anyway: force)", advice)
    return size


def predict_musc_on_ray(
    ray: Any,
    options: RayOptions,
    detector: MuSc,
    thr: Threshold | None,
    image_paths: list[Path],
    names: list[str],
    out: Path,
    settings: dict[str, Any],
    meta: dict[str, Any],
    errors: list[dict[str, str]],
    *,
    resume: bool,
    save_overlays: bool,
    save_masks: bool,
    progress: bool,
) -> tuple[Threshold, dict[str, dict[str, Any]]]:
    """Score ``image_paths`` as one MuSc batch on Ray and write every row (see the module).

    Args:
        thr: the run's threshold, or None to set the batch-robust one from the batch.
        meta: run.json's record (gets ``scored_batch``); ``errors`` gets the unreadable files.

    Returns:
        The threshold and the rows by display path (earlier rows kept, new ones written).
    """
    work = out / WORK_DIR
    size = _shard_size(detector, options, len(image_paths))
    (out / "overlays").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    if save_overlays or save_masks:
        (out / "maps").mkdir(exist_ok=True)
    started = _connect(ray, options, progress)
    try:
        with _actor_pool(ray, options, detector, work, progress) as run:
            t0 = time.perf_counter()
            scored = score_shards(detector, image_paths, work, size, run)
            per_image = (time.perf_counter() - t0) / len(scored.scores)
            errors.extend(scored.errors)
            if thr is None:
                thr = batch_threshold(scored.scores, pixels=scored.pixels)
            meta["scored_batch"] = scored.batch
            done = _resume_run(
                out, settings, thr, resume, meta, image_paths, names,
                save_overlays=save_overlays, save_masks=save_masks,
            )  # fmt: skip
            jobs = write_jobs(
                scored,
                image_paths,
                names,
                done,
                work,
                thr.to_dict(),
                out,
                save_overlays=save_overlays,
                save_masks=save_masks,
                seconds=per_image,
            )
            with open(out / "results.jsonl", "a", encoding="utf-8") as fj:

                def append(_: int, records: list[str]) -> None:
                    for text in records:
                        rec = json.loads(text)
                        if "error" in rec:
                            errors.append(rec["error"])
                        elif rec["row"]["path"] not in done:
                            done[rec["row"]["path"]] = rec["row"]
                            fj.write(json.dumps(rec["row"]) + "\n")
                    fj.flush()
                    os.fsync(fj.fileno())

                run("write", jobs, append)
    finally:
        if started:
            ray.shutdown()
    remove_work(work)
    return thr, done
