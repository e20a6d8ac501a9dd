"""The store's first day: where the daily snapshot partitions begin unless FEATURE_PIPELINE_SNAPSHOT_START says.

Kept beside the store file (`<store>.first-day`, one ISO date), not inside it: the code location reads
it when it loads, while a run may hold DuckDB's write lock. The first writer records it once: the day
of the earliest stored event, or for a new store the day before it was made, so there is a whole day
to snapshot from the start (Dagster's daily partitions end with yesterday).
"""

import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb


def first_day_file(store_path: str | Path) -> Path:
    return Path(f"{store_path}.first-day")


def default_first_day() -> date:
    """Yesterday: the first whole day a new store can snapshot."""
    return datetime.now(UTC).date() - timedelta(days=1)


def read_first_day(store_path: str | Path) -> str | None:
    """The recorded day, or None before the store has been written (or when the file is unreadable)."""
    try:
        return date.fromisoformat(first_day_file(store_path).read_text().strip()).isoformat()
    except (OSError, ValueError):
        return None


def record_first_day(con: duckdb.DuckDBPyConnection, store_path: str | Path) -> None:
    """Once per store, by a writer: the earliest stored event's day (a store made before this file), or
    `default_first_day()`."""
    target = first_day_file(store_path)
    if target.exists():
        return
    earliest = con.execute("SELECT min(occurred_at) FROM event_index").fetchone()
    fallback = default_first_day()
    day = min(earliest[0].astimezone(UTC).date(), fallback) if earliest and earliest[0] else fallback
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(day.isoformat() + "\n")
    os.replace(temporary, target)
