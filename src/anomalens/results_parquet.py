"""Result rows as sharded Parquet: ``OUT/results.parquet/part-00000.parquet``, ``part-00001...``

``anomalens predict --parquet`` writes every row of ``results.csv`` (its columns, typed; see
:data:`COLUMNS`) into shards of at most ``rows_per_shard`` rows while the run goes on. A shard
is written whole to a temporary file and renamed into place, so a killed run never leaves half
a shard. A resumed run keeps the shards whose rows it keeps, removes the others (made with
other settings or another threshold) and writes each remaining row once: the union of the
shards holds every scored image exactly once.

Read them with any Parquet reader, e.g. ``pyarrow.dataset.dataset("OUT/results.parquet")`` or
``pandas.read_parquet("OUT/results.parquet")`` (files starting with ``.`` are temporary and
skipped by both).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from anomalens.fileio import atomic_write_bytes

__all__ = [
    "COLUMNS",
    "DEFAULT_ROWS_PER_SHARD",
    "PARQUET_DIR",
    "ParquetShards",
    "parquet_schema",
    "require_pyarrow",
]

log = logging.getLogger(__name__)

#: The shards' folder inside a run's output folder.
PARQUET_DIR = "results.parquet"
#: Rows per shard unless told: about 5-10 MB of Parquet per shard.
DEFAULT_ROWS_PER_SHARD = 100_000
INSTALL_HINT = 'pip install "anomalens[parquet]"'

#: A shard's columns: those of results.csv, in its order, as (name, Arrow type, nullable).
#: Text is as in results.jsonl (no spreadsheet escaping); ``overlay`` and ``mask`` are paths
#: relative to the run's folder, "" when not written; ``normalized_score`` is null when the
#: threshold records no range of normal scores.
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("path", "string", False),
    ("score", "float64", False),
    ("normalized_score", "float64", True),
    ("decision", "string", False),
    ("threshold", "float64", False),
    ("overlay", "string", False),
    ("mask", "string", False),
    ("seconds", "float64", True),
)
_SHARD = re.compile(r"part-(\d+)\.parquet")


def require_pyarrow() -> Any:
    """The ``pyarrow`` module (with Parquet), or an error that says how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # a pyarrow build may lack its Parquet part
    except ImportError as exc:
        raise RuntimeError(
            f"--parquet needs pyarrow, which is not installed: {INSTALL_HINT} "
            "(or pip install 'pyarrow>=14')"
        ) from exc
    return pyarrow


def parquet_schema() -> Any:
    """The shards' ``pyarrow.Schema`` (see :data:`COLUMNS`)."""
    pa = require_pyarrow()
    return pa.schema([pa.field(n, getattr(pa, t)(), nullable=z) for n, t, z in COLUMNS])


def _project(row: Mapping[str, Any]) -> dict[str, Any]:
    """A results row reduced to the shard columns, with their Python types."""
    out: dict[str, Any] = {}
    for name, kind, nullable in COLUMNS:
        value = row.get(name)
        if value is None and nullable:
            out[name] = None
        elif kind == "string":
            out[name] = "" if value is None else str(value)
        else:
            out[name] = float(value) if value is not None else math.nan
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal rows, NaN equal to NaN (a score can be NaN)."""
    for k, x in a.items():
        y = b.get(k)
        both_nan = isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
        if x != y and not both_nan:
            return False
    return True


class ParquetShards:
    """The Parquet shards of one run's result rows, appended to as rows arrive.

    Args:
        folder: the shards' folder (``OUT/results.parquet``); created if missing.
        rows: the rows the run already holds (key: path), e.g. resumed from results.jsonl.
            A shard is kept when each of its rows equals one of these (and no earlier kept
            shard holds the same path); any other shard is removed. Rows held but in no kept
            shard are written again, so the shards end up holding each row once.
        rows_per_shard: rows per shard; the last shard of a run holds the rest.

    Raises:
        RuntimeError: pyarrow is not installed (the message says how to install it).
        ValueError: ``rows_per_shard`` below 1.
    """

    def __init__(
        self,
        folder: str | Path,
        rows: Mapping[str, Mapping[str, Any]] | None = None,
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"--parquet-rows must be at least 1, got {rows_per_shard}")
        self._pa = require_pyarrow()
        self.schema = parquet_schema()
        self.folder = Path(folder)
        self.rows_per_shard = rows_per_shard
        self.num_shards = 0
        self.num_rows = 0
        self._next = 0
        self._seen: set[str] = set()
        self._buffer: list[dict[str, Any]] = []
        held = rows or {}
        self.folder.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.glob(".*.tmp"):  # a write interrupted by a kill
            tmp.unlink()
        for index, shard in self._shards():
            self._next = index + 1
            kept = self._check(shard, held)
            if kept is None:
                log.info("%s: rows not those of this run; removed (written again)", shard)
                shard.unlink()
                continue
            self._seen.update(kept)
            self.num_shards += 1
            self.num_rows += len(kept)
        self.add(r for k, r in held.items() if k not in self._seen)

    def _shards(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.folder.iterdir():
            m = _SHARD.fullmatch(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def _check(self, shard: Path, held: Mapping[str, Mapping[str, Any]]) -> list[str] | None:
        """The paths of a shard worth keeping, or None when it must go."""
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(shard)
        except (OSError, self._pa.ArrowException) as exc:
            log.warning("%s: unreadable (%s)", shard, exc)
            return None
        if not table.schema.equals(self.schema):
            return None
        paths = []
        for row in table.to_pylist():
            key = row["path"]
            if key in self._seen or key not in held or not _same(row, _project(held[key])):
                return None
            paths.append(key)
        if len(set(paths)) != len(paths):
            return None
        return paths

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Take rows (each path once: a path already taken is skipped); write full shards."""
        for row in rows:
            key = str(row["path"])
            if key in self._seen:
                continue
            self._seen.add(key)
            self._buffer.append(_project(row))
            if len(self._buffer) >= self.rows_per_shard:
                self._flush()

    def close(self) -> None:
        """Write the rows still pending as the last shard."""
        if self._buffer:
            self._flush()

    def summary(self) -> dict[str, Any]:
        """What run.json records: folder, rows per shard, shards and rows written."""
        return {
            "folder": self.folder.name,
            "rows_per_shard": self.rows_per_shard,
            "shards": self.num_shards,
            "rows": self.num_rows,
        }

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        table = self._pa.Table.from_pylist(self._buffer, schema=self.schema)
        sink = self._pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(
            self.folder / f"part-{self._next:05d}.parquet", sink.getvalue().to_pybytes()
        )
        self._next += 1
        self.num_shards += 1
        self.num_rows += len(self._buffer)
        self._buffer = []
