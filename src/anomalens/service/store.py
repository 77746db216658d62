"""Results store: one row per inspected image, in SQLite or PostgreSQL (SQLAlchemy Core).

The same code serves both back ends; the URL decides (``sqlite:///path`` by default,
``postgresql+psycopg://user:pass@host/db`` for a server). Times are stored as naive UTC.

Background jobs live here too (``anomalens_jobs`` and one ``anomalens_job_items`` row per
image), so that a restarted server resumes them; an ``Idempotency-Key`` maps a retried
submission onto the job it already created.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from anomalens.fileio import spreadsheet_safe

__all__ = ["CSV_FIELDS", "HistoryFilter", "JobRow", "ResultStore", "utc_naive"]

metadata = sa.MetaData()

inspections = sa.Table(
    "anomalens_inspections",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("profile", sa.String(64), nullable=False),
    sa.Column("profile_uid", sa.String(32), nullable=False),
    sa.Column("file_name", sa.String(255), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("queue_seconds", sa.Float, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
    sa.Column("image_path", sa.String(512), nullable=False),
    sa.Column("overlay_path", sa.String(512), nullable=False),
    sa.Column("heatmap_path", sa.String(512), nullable=False),
    sa.Column("mask_path", sa.String(512), nullable=False),
    sa.Column("job_id", sa.String(32), nullable=True),
    sa.Index("ix_anomalens_inspections_profile_created", "profile", "created_at"),
    sa.Index("ix_anomalens_inspections_created", "created_at"),
    sa.Index("ix_anomalens_inspections_verdict", "verdict"),
)

jobs = sa.Table(
    "anomalens_jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("profile", sa.String(64), nullable=False),
    sa.Column("profile_uid", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=True),
    sa.Column("errors", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=False), nullable=True),
    sa.UniqueConstraint("profile", "idempotency_key", name="uq_anomalens_jobs_key"),
    sa.Index("ix_anomalens_jobs_status", "status"),
)

job_items = sa.Table(
    "anomalens_job_items",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("file_name", sa.String(255), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("record_id", sa.Integer, nullable=True),
)

inspect_keys = sa.Table(
    "anomalens_inspect_keys",
    metadata,
    sa.Column("profile", sa.String(64), primary_key=True),
    sa.Column("idempotency_key", sa.String(200), primary_key=True),
    sa.Column("record_ids", sa.Text, nullable=False),
    sa.Column("errors", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
)

#: Job states; ``queued`` and ``running`` ones are resumed at start-up.
UNFINISHED = ("queued", "running")

CSV_FIELDS = (
    "id",
    "created_at",
    "profile",
    "file_name",
    "sha256",
    "score",
    "verdict",
    "threshold",
    "seconds",
    "queue_seconds",
    "image_path",
    "overlay_path",
    "mask_path",
    "job_id",
)


def utc_naive(t: datetime) -> datetime:
    """A datetime as naive UTC (aware values are converted, naive ones taken as UTC)."""
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc).replace(tzinfo=None)
    return t


@dataclass(frozen=True)
class HistoryFilter:
    """Filters of a history query; None means "any".

    Attributes:
        profile: profile name.
        verdict: ``normal`` or ``anomalous``.
        since: earliest ``created_at`` (inclusive).
        until: latest ``created_at`` (exclusive).
    """

    profile: str | None = None
    verdict: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> list[sa.ColumnElement[bool]]:
        c = inspections.c
        out: list[sa.ColumnElement[bool]] = []
        if self.profile is not None:
            out.append(c.profile == self.profile)
        if self.verdict is not None:
            out.append(c.verdict == self.verdict)
        if self.since is not None:
            out.append(c.created_at >= utc_naive(self.since))
        if self.until is not None:
            out.append(c.created_at < utc_naive(self.until))
        return out


def _row_dict(row: sa.Row[Any]) -> dict[str, Any]:
    return dict(row._mapping)


@dataclass(frozen=True)
class JobRow:
    """A stored job.

    Attributes:
        id: hex id.
        profile: profile name; ``profile_uid`` the incarnation it was submitted to.
        status: ``queued``, ``running``, ``done`` or ``failed``.
        total: images to inspect; ``done`` of them have a result.
        message: why a ``failed`` job failed.
        errors: uploads refused before the job started (file_name, message).
    """

    id: str
    profile: str
    profile_uid: str
    status: str
    total: int
    done: int
    message: str | None
    errors: list[dict[str, str]]
    idempotency_key: str | None
    created_at: datetime
    finished_at: datetime | None


def _add_missing_columns(engine: Engine) -> None:
    """Columns added after a database was created (``CREATE TABLE`` does not change one)."""
    have = {c["name"] for c in sa.inspect(engine).get_columns(inspections.name)}
    if "queue_seconds" not in have:
        with engine.begin() as conn:
            conn.execute(sa.text(f"ALTER TABLE {inspections.name} ADD COLUMN queue_seconds FLOAT"))


class ResultStore:
    """Inspection records in a SQL database.

    Args:
        url: SQLAlchemy database URL.
        engine_kwargs: extra ``sqlalchemy.create_engine`` options.
    """

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"future": True, **engine_kwargs}
        if url.startswith("sqlite"):
            # one file shared by the request threads and the job threads
            kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        else:
            kwargs.setdefault("pool_pre_ping", True)
        self.engine: Engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def drop_all(self) -> None:
        """Remove the store's tables (tests on a shared PostgreSQL database)."""
        metadata.drop_all(self.engine)

    # ------------------------------------------------------------------ writes
    def add(self, records: Sequence[dict[str, Any]]) -> list[int]:
        """Insert records (keys: the table's columns but ``id``); returns their ids in order."""
        ids = []
        with self.engine.begin() as conn:
            for rec in records:
                rec = dict(rec)
                rec["created_at"] = utc_naive(rec.get("created_at") or datetime.now(timezone.utc))
                res = conn.execute(sa.insert(inspections).values(**rec))
                key = res.inserted_primary_key
                assert key is not None  # an INSERT always has one
                ids.append(int(key[0]))
        return ids

    # ------------------------------------------------------------------ jobs
    def create_job(
        self,
        job_id: str,
        profile: str,
        profile_uid: str,
        items: Sequence[tuple[str, str]],
        errors: list[dict[str, str]],
        idempotency_key: str | None = None,
    ) -> JobRow:
        """Store a queued job and its images ``(file_name, sha256)`` in one transaction.

        With an ``idempotency_key`` already used for ``profile``, nothing is stored and the
        existing job is returned.
        """
        if idempotency_key is not None:
            existing = self.find_job(profile, idempotency_key)
            if existing is not None:
                return existing
        now = utc_naive(datetime.now(timezone.utc))
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    sa.insert(jobs).values(
                        id=job_id,
                        profile=profile,
                        profile_uid=profile_uid,
                        status="queued",
                        total=len(items),
                        message=None,
                        errors=json.dumps(errors),
                        idempotency_key=idempotency_key,
                        created_at=now,
                    )
                )
                if items:
                    conn.execute(
                        sa.insert(job_items),
                        [
                            {"job_id": job_id, "idx": i, "file_name": n, "sha256": h}
                            for i, (n, h) in enumerate(items)
                        ],
                    )
        except sa.exc.IntegrityError:
            # the same key submitted concurrently: the first one won
            existing = self.find_job(profile, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return existing
        job = self.get_job(job_id)
        assert job is not None
        return job

    def find_job(self, profile: str, idempotency_key: str) -> JobRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(jobs.c.id).where(
                    jobs.c.profile == profile, jobs.c.idempotency_key == idempotency_key
                )
            ).first()
        return self.get_job(row[0]) if row is not None else None

    def _job_row(self, conn: sa.Connection, row: sa.Row[Any]) -> JobRow:
        d = _row_dict(row)
        done = conn.execute(
            sa.select(sa.func.count())
            .select_from(job_items)
            .where(job_items.c.job_id == d["id"], job_items.c.record_id.is_not(None))
        ).scalar_one()
        d["errors"] = json.loads(d["errors"] or "[]")
        return JobRow(done=int(done), **d)

    def get_job(self, job_id: str) -> JobRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            return self._job_row(conn, row) if row is not None else None

    def list_jobs(self, limit: int = 100) -> list[JobRow]:
        """The newest ``limit`` jobs."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
            ).all()
            return [self._job_row(conn, r) for r in rows]

    def unfinished_jobs(self) -> list[JobRow]:
        """Queued or running jobs, oldest first (to resume at start-up)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(jobs).where(jobs.c.status.in_(UNFINISHED)).order_by(jobs.c.created_at)
            ).all()
            return [self._job_row(conn, r) for r in rows]

    def set_job_status(self, job_id: str, status: str, message: str | None = None) -> None:
        values: dict[str, Any] = {"status": status}
        if message is not None:
            values["message"] = message
        if status not in UNFINISHED:
            values["finished_at"] = utc_naive(datetime.now(timezone.utc))
        with self.engine.begin() as conn:
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**values))

    def pending_items(self, job_id: str) -> list[dict[str, Any]]:
        """Images of a job that have no result yet, in submission order.

        Results recorded for the job but not yet marked on their item (a crash between the
        two writes) are matched to their items first, so that nothing is inspected twice.
        """
        self._claim_orphan_results(job_id)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(job_items)
                .where(job_items.c.job_id == job_id, job_items.c.record_id.is_(None))
                .order_by(job_items.c.idx)
            ).all()
        return [_row_dict(r) for r in rows]

    def _claim_orphan_results(self, job_id: str) -> None:
        c, it = inspections.c, job_items.c
        with self.engine.begin() as conn:
            claimed = set(
                conn.execute(
                    sa.select(it.record_id).where(it.job_id == job_id, it.record_id.is_not(None))
                ).scalars()
            )
            records = conn.execute(
                sa.select(c.id, c.sha256, c.file_name).where(c.job_id == job_id).order_by(c.id)
            ).all()
            for rid, sha, name in records:
                if rid in claimed:
                    continue
                idx = conn.execute(
                    sa.select(it.idx)
                    .where(
                        it.job_id == job_id,
                        it.record_id.is_(None),
                        it.sha256 == sha,
                        it.file_name == name,
                    )
                    .order_by(it.idx)
                    .limit(1)
                ).scalar()
                if idx is not None:
                    conn.execute(
                        sa.update(job_items)
                        .where(it.job_id == job_id, it.idx == idx)
                        .values(record_id=rid)
                    )

    def mark_items_done(self, job_id: str, records: Sequence[dict[str, Any]]) -> None:
        """Attach stored results to the job's first matching pending items."""
        if records:
            self._claim_orphan_results(job_id)

    def job_results(self, job_id: str) -> list[dict[str, Any]]:
        """The stored results of a job, in submission order."""
        it = job_items.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(inspections)
                .join(job_items, it.record_id == inspections.c.id)
                .where(it.job_id == job_id)
                .order_by(it.idx)
            ).all()
        return [_row_dict(r) for r in rows]

    # ------------------------------------------------------------------ inspect keys
    def remember_inspection(
        self,
        profile: str,
        idempotency_key: str,
        record_ids: Sequence[int],
        errors: list[dict[str, str]],
    ) -> None:
        """Map a ``/inspect`` request's ``Idempotency-Key`` to the results it stored."""
        row = {
            "profile": profile,
            "idempotency_key": idempotency_key,
            "record_ids": json.dumps(list(record_ids)),
            "errors": json.dumps(errors),
            "created_at": utc_naive(datetime.now(timezone.utc)),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(inspect_keys).values(**row))
        except sa.exc.IntegrityError:
            pass  # a concurrent request with the same key stored its answer first

    def recall_inspection(
        self, profile: str, idempotency_key: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, str]]] | None:
        """The results and upload errors of an earlier request with this key, or None."""
        k = inspect_keys.c
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(k.record_ids, k.errors).where(
                    k.profile == profile, k.idempotency_key == idempotency_key
                )
            ).first()
        if row is None:
            return None
        records = [self.get(int(i)) for i in json.loads(row[0])]
        return [r for r in records if r is not None], json.loads(row[1])

    # ------------------------------------------------------------------ reads
    def get(self, record_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(inspections).where(inspections.c.id == record_id)).first()
        return _row_dict(row) if row is not None else None

    def query(
        self, filters: HistoryFilter | None = None, *, limit: int = 50, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of records, newest first, and the total number matching the filters."""
        if limit < 1 or offset < 0:
            raise ValueError(f"limit must be >= 1 and offset >= 0, got {limit}, {offset}")
        where = (filters or HistoryFilter()).where()
        c = inspections.c
        sel = (
            sa.select(inspections)
            .where(*where)
            .order_by(c.created_at.desc(), c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        count = sa.select(sa.func.count()).select_from(inspections).where(*where)
        with self.engine.connect() as conn:
            rows = [_row_dict(r) for r in conn.execute(sel)]
            total = int(conn.execute(count).scalar_one())
        return rows, total

    def iter_csv(self, filters: HistoryFilter | None = None, chunk: int = 1000) -> Iterator[str]:
        """The matching records as CSV text, header first, newest first, ``chunk`` rows a piece.

        Text cells that a spreadsheet would run as a formula are prefixed with ``'``.
        """
        where = (filters or HistoryFilter()).where()
        c = inspections.c
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(CSV_FIELDS)
        yield buf.getvalue()
        last: tuple[datetime, int] | None = None
        while True:
            sel = sa.select(inspections).where(*where)
            if last is not None:  # keyset paging: stable while new rows arrive
                sel = sel.where(
                    sa.or_(
                        c.created_at < last[0],
                        sa.and_(c.created_at == last[0], c.id < last[1]),
                    )
                )
            sel = sel.order_by(c.created_at.desc(), c.id.desc()).limit(chunk)
            with self.engine.connect() as conn:
                rows = [_row_dict(r) for r in conn.execute(sel)]
            if not rows:
                return
            buf = io.StringIO()
            writer = csv.writer(buf)
            for r in rows:
                writer.writerow([_csv_cell(r[k]) for k in CSV_FIELDS])
            yield buf.getvalue()
            last = (rows[-1]["created_at"], rows[-1]["id"])
            if len(rows) < chunk:
                return


def _csv_cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds") + "Z"
    return "" if value is None else spreadsheet_safe(value)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
