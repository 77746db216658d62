"""Background inspection jobs: a thread pool, progress counters, a bounded job table."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from anomalens.service.errors import ServiceError

__all__ = ["Job", "JobManager"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A batch inspection running in the background.

    Attributes:
        id: random hex id.
        profile: profile name.
        total: images to inspect.
        done: images inspected so far.
        status: ``queued``, ``running``, ``done`` or ``failed``.
        results: records of the inspected images (grows as the job runs).
        errors: uploads rejected before the job started (file_name, message).
        message: the failure reason of a ``failed`` job.
    """

    id: str
    profile: str
    total: int
    errors: list[dict[str, str]] = field(default_factory=list)
    done: int = 0
    status: str = "queued"
    results: list[dict[str, Any]] = field(default_factory=list)
    message: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    finished_at: datetime | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_results(self, records: list[dict[str, Any]]) -> None:
        with self._lock:
            self.results.extend(records)
            self.done += len(records)

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy for a status response."""
        with self._lock:
            return {
                "id": self.id,
                "profile": self.profile,
                "total": self.total,
                "done": self.done,
                "status": self.status,
                "results": list(self.results),
                "errors": list(self.errors),
                "message": self.message,
                "created_at": self.created_at,
                "finished_at": self.finished_at,
            }

    def _set(self, status: str, message: str | None = None) -> None:
        with self._lock:
            self.status = status
            if message is not None:
                self.message = message
            if status in ("done", "failed"):
                self.finished_at = datetime.now(timezone.utc)


class JobManager:
    """Runs jobs on ``workers`` threads; keeps the last ``keep`` jobs for status queries."""

    def __init__(self, workers: int = 2, keep: int = 500) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anomalens-job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self.keep = keep

    def submit(
        self,
        profile: str,
        total: int,
        work: Callable[[Job], None],
        errors: list[dict[str, str]] | None = None,
    ) -> Job:
        """Queue ``work(job)``; it reports progress with ``job.add_results``."""
        job = Job(id=uuid.uuid4().hex, profile=profile, total=total, errors=list(errors or []))
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                oldest = next(iter(self._jobs.values()))
                if oldest.status in ("queued", "running"):
                    break
                self._jobs.popitem(last=False)

        def run() -> None:
            job._set("running")
            try:
                work(job)
            except ServiceError as exc:
                job._set("failed", exc.message)
            except Exception as exc:
                log.exception("job %s failed", job.id)
                job._set("failed", f"internal error: {type(exc).__name__}: {exc}")
            else:
                job._set("done")

        self._pool.submit(run)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ServiceError(
                404,
                "not_found",
                f"no job with id {job_id!r} (finished jobs are kept "
                f"for the last {self.keep} jobs and not across restarts)",
            )
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return list(reversed(self._jobs.values()))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
