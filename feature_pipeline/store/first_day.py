"""The store's first day: the day of the earliest event it has ever stored, where snapshot days begin.

Kept beside the store file (`<store>.first-day`, one ISO date), not inside it: the code location and the
CLI read it while a run may hold DuckDB's write lock. Writers keep it current: a store that has stored no
event has no file (so a fresh install offers no snapshot day), and a batch with an event older than the
recorded day moves it earlier, in the batch's transaction (before the commit: a batch rolled back can only
leave the day too early, one empty snapshot day, never too late). It never moves later (archiving moves
events out of the live tables, not out of the history).
"""

import os
from datetime import UTC, date
from pathlib import Path

import duckdb


def first_day_file(store_path: str | Path) -> Path:
    return Path(f"{store_path}.first-day")


def read_first_day(store_path: str | Path) -> str | None:
    """The recorded day, or None before the store holds an event (or when the file is unreadable)."""
    try:
        return date.fromisoformat(first_day_file(store_path).read_text().strip()).isoformat()
    except (OSError, ValueError):
        return None


def record_first_day(con: duckdb.DuckDBPyConnection, store_path: str | Path) -> None:
    """When a writer opens a store with events but no file (made before the file existed, or the file was
    deleted): the earliest stored event's day."""
    if first_day_file(store_path).exists():
        return
    earliest = con.execute("SELECT min(occurred_at) FROM event_index").fetchone()
    if earliest and earliest[0]:
        _write(store_path, earliest[0].astimezone(UTC).date())


def note_batch_first_day(con: duckdb.DuckDBPyConnection, store_path: str | Path, events_table: str) -> None:
    """Inside a batch's transaction: move the first day earlier when the batch holds an older event."""
    earliest = con.execute(f"SELECT min(occurred_at) FROM {events_table}").fetchone()
    if not earliest or not earliest[0]:
        return
    day = earliest[0].astimezone(UTC).date()
    recorded = read_first_day(store_path)
    if recorded is None or day < date.fromisoformat(recorded):
        _write(store_path, day)


def _write(store_path: str | Path, day: date) -> None:
    """Whole or not at all: readers in other processes never see half a date."""
    target = first_day_file(store_path)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    temporary.write_text(day.isoformat() + "\n")
    os.replace(temporary, target)
