"""Archive: raw events older than a horizon move to day-partitioned Parquet, and stay readable.

Layout (hive style, readable by any Parquet tool): `<archive>/<raw table>/day=YYYY-MM-DD/part-<run>.parquet`,
one file per UTC day of occurred_at per run. Every reader of the whole history (the reference feature
query, snapshots, the point-in-time join, the consistency check, replay's comparison) reads the view
`<raw table>_history`: the live table plus the archived files the store lists in `archive_files`.

One run is one DuckDB transaction: the files are written from the transaction's snapshot, then the same
rows are deleted from the live table and from event_index, the files are listed, and the views are
replaced; COMMIT makes all of it visible at once. A run killed before COMMIT leaves files that no view
lists (their rows are still live); the next run deletes them first. So an interrupted archive loses
nothing and stores nothing twice. The window features and the all-time partials never need archived
rows: the horizon must exceed the longest window, and the cutoff never passes the store's clock minus it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb

from feature_pipeline.store.db import scalar
from feature_pipeline.streams import StreamSpec

ARCHIVE_DDL = [
    """
    CREATE TABLE IF NOT EXISTS archive_files (
        table_name VARCHAR NOT NULL,
        day DATE NOT NULL,
        path VARCHAR PRIMARY KEY,
        rows BIGINT NOT NULL,
        run_id VARCHAR NOT NULL,
        archived_at TIMESTAMPTZ NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS archive_runs (
        run_id VARCHAR PRIMARY KEY,
        cutoff TIMESTAMPTZ NOT NULL,
        rows BIGINT NOT NULL,
        finished_at TIMESTAMPTZ NOT NULL
    )
    """,
]


class ArchiveError(ValueError):
    """The archive cannot run as asked; the text says why."""


@dataclass(frozen=True)
class ArchiveResult:
    cutoff: datetime  # rows that occurred before this instant were archived
    rows: dict[str, int]  # per raw table
    files: int
    orphans_removed: int  # files of an earlier run that did not finish
    dry_run: bool = False

    def summary(self) -> str:
        """One line for the CLI and the job's log."""
        moved = ", ".join(f"{n:,} from {table}" for table, n in self.rows.items())
        verb = "would archive" if self.dry_run else f"archived into {self.files} files"
        orphans = f"; removed {self.orphans_removed} files of an unfinished run" if self.orphans_removed else ""
        return f"{verb} events that occurred before {self.cutoff:%Y-%m-%d %H:%M} UTC: {moved}{orphans}"


def history_view(table: str) -> str:
    return f"{table}_history"


def view_ddl(table: str, files: list[str], *, replace: bool) -> str:
    """The live table plus its archived files (column types as the live table has them)."""
    head = (
        f"CREATE OR REPLACE VIEW {history_view(table)}"
        if replace
        else f"CREATE VIEW IF NOT EXISTS {history_view(table)}"
    )
    if not files:
        return f"{head} AS SELECT * FROM {table}"
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return (
        f"{head} AS SELECT * FROM {table} UNION ALL BY NAME "
        f"SELECT * REPLACE (CAST(data AS JSON) AS data) FROM read_parquet([{listed}])"
    )


def cutoff_for(now: datetime, horizon: timedelta, valid_as_of: datetime | None, longest_window: timedelta) -> datetime:
    """The start of the UTC day `horizon` before now, never later than the store's clock minus the longest
    window (a window must still find its rows live)."""
    if horizon <= longest_window:
        raise ArchiveError(
            f"the archive horizon ({horizon.days} days) must be longer than the longest feature window "
            f"({longest_window}); raise FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS"
        )
    limit = now - horizon
    if valid_as_of is not None:
        limit = min(limit, valid_as_of - longest_window)
    return datetime(limit.year, limit.month, limit.day, tzinfo=UTC)


def remove_orphans(con: duckdb.DuckDBPyConnection, root: Path, sources: Sequence[StreamSpec]) -> int:
    """Delete archive files no run finished listing (a killed run's); their rows are still live."""
    listed = {r[0] for r in con.execute("SELECT path FROM archive_files").fetchall()}
    removed = 0
    # Only files of the archive's own layout: anything else under the folder is not ours to delete.
    ours = (p for spec in sources for p in (root / spec.table).glob("day=*/part-*.parquet"))
    for path in ours:
        if str(path) not in listed:
            path.unlink()
            removed += 1
    return removed


def archive(
    con: duckdb.DuckDBPyConnection,
    root: Path,
    cutoff: datetime,
    sources: Sequence[StreamSpec],
    *,
    dry_run: bool = False,
    after_file: Callable[[Path], None] | None = None,
) -> ArchiveResult:
    """Move the raw rows that occurred before `cutoff` to Parquet under `root`, in one transaction.

    `after_file` is called after each file is written and synced (fault drills kill the process there)."""
    if not dry_run:
        root.mkdir(parents=True, exist_ok=True)
    orphans = 0 if dry_run else remove_orphans(con, root, sources)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    rows, written = {}, []
    con.execute("BEGIN")
    try:
        for spec in sources:
            days = _days_before(con, spec.table, cutoff)
            rows[spec.table] = sum(n for _, n in days)
            if dry_run:
                continue
            for day, n in days:
                path = _write_day(con, root, spec.table, day, cutoff, run_id)
                written.append((spec.table, day, str(path), n))
                if after_file is not None:
                    after_file(path)
        if dry_run or not written:
            con.execute("ROLLBACK")
            return ArchiveResult(cutoff, rows, 0, orphans, dry_run)
        _commit_run(con, run_id, cutoff, written, sources)
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return ArchiveResult(cutoff, rows, len(written), orphans)


def _days_before(con: duckdb.DuckDBPyConnection, table: str, cutoff: datetime) -> list[tuple[date, int]]:
    return [
        (r[0], int(r[1]))
        for r in con.execute(
            f"SELECT CAST(occurred_at AS DATE) AS day, count(*) FROM {table} WHERE occurred_at < $c "
            "GROUP BY day ORDER BY day",
            {"c": cutoff},
        ).fetchall()
    ]


def _write_day(
    con: duckdb.DuckDBPyConnection, root: Path, table: str, day: date, cutoff: datetime, run_id: str
) -> Path:
    folder = root / table / f"day={day.isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{run_id}.parquet"
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    target = str(path).replace("'", "''")
    con.execute(
        f"COPY (SELECT * FROM {table} WHERE occurred_at >= $start AND occurred_at < $end AND occurred_at < $cutoff "
        f"ORDER BY occurred_at) TO '{target}' (FORMAT parquet, COMPRESSION zstd)",
        {"start": start, "end": start + timedelta(days=1), "cutoff": cutoff},
    )
    _fsync(path)
    return path


def _fsync(path: Path) -> None:
    """The file and its folder reach the disk before the rows leave the live table."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_run(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    cutoff: datetime,
    written: list[tuple[str, date, str, int]],
    sources: Sequence[StreamSpec],
) -> None:
    now = datetime.now(UTC)
    for table, day, path, n in written:
        con.execute(
            "INSERT INTO archive_files VALUES ($t, $d, $p, $n, $r, $now)",
            {"t": table, "d": day, "p": path, "n": n, "r": run_id, "now": now},
        )
    total = 0
    for spec in sources:
        total += int(scalar(con, f"DELETE FROM {spec.table} WHERE occurred_at < $c", {"c": cutoff}))
        files = [
            r[0]
            for r in con.execute(
                "SELECT path FROM archive_files WHERE table_name = $t ORDER BY day, path", {"t": spec.table}
            ).fetchall()
        ]
        con.execute(view_ddl(spec.table, files, replace=True))
    con.execute("DELETE FROM event_index WHERE occurred_at < $c", {"c": cutoff})
    con.execute(
        "INSERT INTO archive_runs VALUES ($r, $c, $n, $now)", {"r": run_id, "c": cutoff, "n": total, "now": now}
    )
    con.execute("COMMIT")


def archived_copies(con: duckdb.DuckDBPyConnection, events: str) -> int:
    """Drop from the batch's `events` the ids already in the archive (a very late redelivery of an archived
    event). Only the days of the batch's events older than the last cutoff are read. Returns how many."""
    cutoff = scalar(con, "SELECT max(cutoff) FROM archive_runs")
    if cutoff is None:
        return 0
    files = [
        r[0]
        for r in con.execute(
            "SELECT path FROM archive_files WHERE day IN "
            f"(SELECT DISTINCT CAST(occurred_at AS DATE) FROM {events} WHERE occurred_at < $c)",
            {"c": cutoff},
        ).fetchall()
    ]
    if not files:
        return 0
    return int(
        scalar(
            con,
            f"DELETE FROM {events} WHERE occurred_at < $c AND event_id IN (SELECT event_id FROM read_parquet($files))",
            {"c": cutoff, "files": files},
        )
    )
