"""Results store on SQLite (always) and PostgreSQL (when ANOMALENS_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the results store needs the serve extra")

from anomalens.service.store import CSV_FIELDS, HistoryFilter, ResultStore

PG_URL = os.environ.get("ANOMALENS_TEST_POSTGRES_URL")
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(
                not PG_URL,
                reason="ANOMALENS_TEST_POSTGRES_URL is not set (run .ci/service-deps.sh to start a "
                "local PostgreSQL and source the line it prints)",
            ),
        ),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultStore]:
    if request.param == "sqlite":
        s = ResultStore(f"sqlite:///{tmp_path / 'results.sqlite3'}")
    else:
        pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg[binary]")
        s = ResultStore(PG_URL)  # type: ignore[arg-type]
        s.drop_all()  # a clean table on a shared test database
        s = ResultStore(PG_URL)  # type: ignore[arg-type]
    assert s.backend == request.param
    yield s
    if request.param != "sqlite":
        s.drop_all()
    s.close()


def _record(i: int, profile: str = "a", verdict: str = "normal", minutes: int = 0) -> dict:
    return {
        "profile": profile,
        "profile_uid": "u" * 32,
        "file_name": f"img{i}.png",
        "sha256": f"{i:064x}",
        "score": float(i),
        "verdict": verdict,
        "threshold": 2.5,
        "seconds": 0.01,
        "created_at": T0 + timedelta(minutes=minutes),
        "image_path": f"images/{i}.png",
        "overlay_path": f"artifacts/{i}_overlay.png",
        "heatmap_path": f"artifacts/{i}_heatmap.png",
        "mask_path": f"artifacts/{i}_mask.png",
        "job_id": None,
    }


@pytest.fixture
def filled(store: ResultStore) -> ResultStore:
    recs = [
        _record(
            i,
            profile="a" if i % 2 else "b",
            verdict="anomalous" if i % 3 == 0 else "normal",
            minutes=i,
        )
        for i in range(10)
    ]
    ids = store.add(recs)
    assert len(set(ids)) == 10
    return store


def test_add_and_get_roundtrip(store: ResultStore) -> None:
    (rid,) = store.add([_record(7, minutes=3)])
    rec = store.get(rid)
    assert rec is not None
    assert rec["file_name"] == "img7.png" and rec["score"] == 7.0 and rec["verdict"] == "normal"
    assert rec["created_at"] == (T0 + timedelta(minutes=3)).replace(tzinfo=None)  # naive UTC
    assert store.get(rid + 1000) is None


def test_paging_is_newest_first_and_complete(filled: ResultStore) -> None:
    seen = []
    for offset in range(0, 10, 3):
        rows, total = filled.query(limit=3, offset=offset)
        assert total == 10
        seen += [r["score"] for r in rows]
    assert seen == [float(i) for i in range(9, -1, -1)]
    with pytest.raises(ValueError, match="limit"):
        filled.query(limit=0)


def test_filters(filled: ResultStore) -> None:
    rows, total = filled.query(HistoryFilter(profile="a"))
    assert total == 5 and {r["profile"] for r in rows} == {"a"}
    rows, total = filled.query(HistoryFilter(verdict="anomalous"))
    assert sorted(r["score"] for r in rows) == [0.0, 3.0, 6.0, 9.0] and total == 4
    rows, total = filled.query(HistoryFilter(profile="a", verdict="anomalous"))
    assert sorted(r["score"] for r in rows) == [3.0, 9.0]
    # date range: [since, until), aware times in any zone
    cest = timezone(timedelta(hours=2))
    since = (T0 + timedelta(minutes=2)).astimezone(cest)
    until = T0 + timedelta(minutes=5)
    rows, total = filled.query(HistoryFilter(since=since, until=until))
    assert sorted(r["score"] for r in rows) == [2.0, 3.0, 4.0] and total == 3


def test_csv_export(filled: ResultStore) -> None:
    filled.add([{**_record(99, minutes=30), "file_name": "=HYPERLINK(1).png"}])
    text = "".join(filled.iter_csv(HistoryFilter(profile="a"), chunk=2))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0].keys()) == CSV_FIELDS
    assert [float(r["score"]) for r in rows] == [99.0, 9.0, 7.0, 5.0, 3.0, 1.0]  # keyset pages of 2
    assert rows[0]["file_name"] == "'=HYPERLINK(1).png"  # no formula for spreadsheets
    assert rows[1]["created_at"] == "2024-05-01T12:09:00.000Z"
    empty = "".join(filled.iter_csv(HistoryFilter(profile="nobody")))
    assert empty.strip() == ",".join(CSV_FIELDS)
