"""Results store: one row per inspected image, in SQLite or PostgreSQL (SQLAlchemy Core).

The same code serves both back ends; the URL decides (``sqlite:///path`` by default,
``postgresql+psycopg://user:pass@host/db`` for a server). Times are stored as naive UTC.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

__all__ = ["CSV_FIELDS", "HistoryFilter", "ResultStore", "utc_naive"]

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
    "image_path",
    "overlay_path",
    "mask_path",
    "job_id",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


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
                ids.append(int(res.inserted_primary_key[0]))
        return ids

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
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return "" if value is None else value


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
