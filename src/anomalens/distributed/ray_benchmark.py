"""``anomalens benchmark --engine ray``: each (category, k, seed) cell one Ray task.

Every task builds its own detector from the run's settings, runs the cell with
:func:`anomalens.benchmark.runner.run_cell` and writes the cell's job and scores files into
``OUT`` (which every worker must be able to write; the dataset root must be readable by every
worker). The driver then builds results.csv, summary.csv, results.md and results.json from the
job files exactly as the local run does. A rerun skips the cells whose job file exists; a task
whose worker dies is retried by Ray.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from anomalens.benchmark.runner import BenchmarkConfig
from anomalens.distributed.ray_predict import RayOptions, _connect, require_ray

__all__ = ["run_cells_on_ray"]


def _cell(cfg: dict[str, Any], cat: str, k: int, seed: int | None) -> str:
    """One benchmark cell on a worker; returns its tag for the driver's log."""
    from anomalens.benchmark.runner import run_cell
    from anomalens.registry import create_detector

    config = BenchmarkConfig(**cfg)
    detector = create_detector(config.method, **config.method_kwargs)
    run_cell(config, detector, cat, k, seed, progress=False)
    return f"{cat} k={k} seed={seed}"


def run_cells_on_ray(
    cfg: BenchmarkConfig,
    cells: list[tuple[str, int, int | None]],
    *,
    options: RayOptions | None = None,
    progress: bool = True,
) -> None:
    """Run ``cells`` as Ray tasks, at most ``options.workers`` at a time.

    Pass it to ``run_benchmark(cfg, run_cells=functools.partial(run_cells_on_ray,
    options=...))``.

    Raises:
        RuntimeError: Ray is not installed, or a cell failed (after Ray's retries); the cells
            finished before are kept and a rerun skips them.
    """
    ray = require_ray()
    options = options or RayOptions()
    started = _connect(ray, options, progress)
    try:
        remote = ray.remote(
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker,
            max_retries=3,
        )(_cell)
        config = asdict(cfg)
        queue = list(cells)
        running: list[Any] = []
        while queue or running:
            while queue and len(running) < options.workers:
                running.append(remote.remote(config, *queue.pop(0)))
            finished, running = ray.wait(running, num_returns=1)
            try:
                ray.get(finished)
            except ray.exceptions.RayError as exc:
                raise RuntimeError(
                    f"a benchmark cell failed on Ray (finished cells are kept; rerun to "
                    f"resume): {exc}"
                ) from exc
    finally:
        if started:
            ray.shutdown()
