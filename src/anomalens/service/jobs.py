"""Background inspection jobs, durable: a thread pool that works on jobs stored in the results
store.

A job's images are written to the data folder and its rows (the job, one item per image) to the
store *before* the submission is acknowledged. The worker inspects the pending items batch by
batch; every result row names its job, so after a crash (``kill -9``) the next start-up matches
results already stored to their items and inspects only what is left. A job that cannot go on
(profile deleted or re-created, image file gone) is marked ``failed`` with the reason.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from anomalens.service.errors import ServiceError
from anomalens.service.store import JobRow, ResultStore

__all__ = ["JobManager"]

log = logging.getLogger(__name__)

#: ``work(job_id)`` inspects the job's pending items; raising marks the job failed.
JobWork = Callable[[str], None]


class JobManager:
    """Runs stored jobs on ``workers`` threads; state lives in ``store``.

    Args:
        store: the results store (jobs, items, results).
        work: what running a job means (the app's inspection of its pending items).
        workers: threads.
    """

    def __init__(self, store: ResultStore, work: JobWork, workers: int = 2) -> None:
        self.store = store
        self._work = work
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anomalens-job")
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def start(self, job_id: str) -> None:
        """Queue a stored job (no-op when it is already queued or running here)."""
        with self._lock:
            if job_id in self._active:
                return
            self._active.add(job_id)
        self._pool.submit(self._run, job_id)

    def resume_all(self) -> list[str]:
        """Queue every job left ``queued`` or ``running`` by a previous server process."""
        ids = [j.id for j in self.store.unfinished_jobs()]
        for job_id in ids:
            self.store.set_job_status(job_id, "queued")
            self.start(job_id)
        if ids:
            log.info("resuming %d unfinished job(s)", len(ids))
        return ids

    def _run(self, job_id: str) -> None:
        try:
            self.store.set_job_status(job_id, "running")
            self._work(job_id)
        except ServiceError as exc:
            self.store.set_job_status(job_id, "failed", exc.message)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self.store.set_job_status(job_id, "failed", f"internal error: {type(exc).__name__}")
        else:
            self.store.set_job_status(job_id, "done")
        finally:
            with self._lock:
                self._active.discard(job_id)

    def get(self, job_id: str) -> JobRow:
        job = self.store.get_job(job_id) if len(job_id) <= 64 else None
        if job is None:
            raise ServiceError(404, "not_found", f"no job with id {job_id[:64]!r}")
        return job

    def list(self, limit: int = 100) -> list[JobRow]:
        return self.store.list_jobs(limit)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
