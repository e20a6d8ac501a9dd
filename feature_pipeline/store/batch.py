"""The steps that store one staged batch, each a statement or two inside the caller's transaction.

Idempotent: events are keyed by id across every stream (a redelivered or duplicated event is
absorbed), dead letters by original stream and sequence. An id seen again with other content, or on
another stream, is recorded in dead_letters, not merged: the first stored version stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import duckdb

from feature_pipeline import streams
from feature_pipeline.store.db import one, scalar

EVENTS = "batch_events"  # temp table: the batch's events, one row per (stream, event id)
TOUCHED = "touched_users"  # temp table: the users of the batch's events


@dataclass(frozen=True)
class StagedFiles:
    """The Parquet files of one staged batch."""

    folder: Path

    @property
    def events(self) -> str:
        return str(self.folder / "events.parquet")

    @property
    def dead_letters(self) -> str:
        return str(self.folder / "dead_letters.parquet")

    @property
    def deliveries(self) -> str:
        return str(self.folder / "deliveries.parquet")


@dataclass(frozen=True)
class Written:
    """What a batch's writes did, for the result and the run metadata."""

    events_in_batch: int  # every event message of the batch, duplicates included
    inserted: dict[str, int]  # new raw rows per stream name
    dead_letters: int
    conflicts: int
    users_touched: int


def write(con: duckdb.DuckDBPyConnection, files: StagedFiles, batch_id: str, now: datetime) -> Written:
    """Every write of the batch except the feature refresh, in order."""
    events_in_batch = load_events(con, files)
    inserted = insert_events(con, batch_id, now)
    dead = insert_dead_letters(con, files, batch_id, now)
    conflicts = record_conflicting_duplicates(con, files, batch_id, now)
    touched = touch_users(con)
    written = Written(events_in_batch, inserted, dead, conflicts, touched)
    record_batch(con, batch_id, now, written)
    return written


def load_events(con: duckdb.DuckDBPyConnection, files: StagedFiles) -> int:
    """The batch's events into a temp table, one per id (the first the streams stored); returns how many
    the batch held."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {EVENTS} AS SELECT * FROM read_parquet($p) "
        "QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY received_at, stream, stream_seq) = 1",
        {"p": files.events},
    )
    return int(scalar(con, "SELECT count(*) FROM read_parquet($p)", {"p": files.events}))


def insert_events(con: duckdb.DuckDBPyConnection, batch_id: str, now: datetime) -> dict[str, int]:
    """New ids into their stream's table; an id another stream's table already holds is not inserted."""
    inserted = {}
    for spec in streams.EVENT_STREAMS:
        elsewhere = " ".join(
            f"AND NOT EXISTS (SELECT 1 FROM {o.table} o WHERE o.event_id = b.event_id)"
            for o in streams.EVENT_STREAMS
            if o is not spec
        )
        inserted[spec.name] = int(
            scalar(
                con,
                f"INSERT INTO {spec.table} SELECT event_id, subject, stream_seq, occurred_at, received_at, $now, "
                f"user_id, type, schema_version, data, known_type, $batch FROM {EVENTS} b "
                f"WHERE stream = $stream {elsewhere} ON CONFLICT DO NOTHING",
                {"now": now, "batch": batch_id, "stream": spec.name},
            )
        )
    return inserted


def insert_dead_letters(con: duckdb.DuckDBPyConnection, files: StagedFiles, batch_id: str, now: datetime) -> int:
    return int(
        scalar(
            con,
            f"INSERT INTO {streams.DEADLETTER.table} SELECT original_stream, original_subject, original_seq, "
            "delivery_count, reason, dead_lettered_at, deadletter_seq, body, $now, $batch FROM read_parquet($p) "
            "QUALIFY row_number() OVER (PARTITION BY original_stream, original_seq ORDER BY deadletter_seq) = 1 "
            "ON CONFLICT DO NOTHING",
            {"now": now, "batch": batch_id, "p": files.dead_letters},
        )
    )


def record_conflicting_duplicates(
    con: duckdb.DuckDBPyConnection, files: StagedFiles, batch_id: str, now: datetime
) -> int:
    """An id seen again with other content, or on another stream, is not absorbed silently: the first
    stored version stays, each other version goes to dead_letters with its body and both sequences in
    the reason (deadletter_seq 0: recorded by the run, not republished on DEADLETTER)."""
    total = 0
    for spec in streams.EVENT_STREAMS:
        total += int(
            scalar(
                con,
                f"""
                INSERT INTO {streams.DEADLETTER.table}
                SELECT b.stream, b.subject, b.stream_seq, b.num_delivered,
                       CASE WHEN b.stream = $stream
                            THEN 'duplicate id ' || b.event_id || ' with different content; kept the first '
                                 || 'stored version (' || $stream || ' #' || e.stream_seq || ')'
                            ELSE 'id ' || b.event_id || ' is already used by ' || e.subject || ' ('
                                 || $stream || ' #' || e.stream_seq || '); ids must be unique across streams; '
                                 || 'kept the first stored version'
                       END,
                       $now, 0, d.body, $now, $batch
                FROM read_parquet($events) b
                JOIN {spec.table} e ON e.event_id = b.event_id
                LEFT JOIN read_parquet($deliveries) d ON d.stream = b.stream AND d.stream_seq = b.stream_seq
                WHERE (b.stream <> $stream OR e.stream_seq <> b.stream_seq)
                  AND (b.stream <> $stream
                       OR (e.user_id, e.type, e.occurred_at, CAST(e.data AS VARCHAR))
                          IS DISTINCT FROM (b.user_id, b.type, b.occurred_at, b.data))
                ON CONFLICT DO NOTHING
                """,
                {
                    "stream": spec.name,
                    "now": now,
                    "batch": batch_id,
                    "events": files.events,
                    "deliveries": files.deliveries,
                },
            )
        )
    return total


def touch_users(con: duckdb.DuckDBPyConnection) -> int:
    con.execute(f"CREATE OR REPLACE TEMP TABLE {TOUCHED} AS SELECT DISTINCT user_id FROM {EVENTS}")
    return int(scalar(con, f"SELECT count(*) FROM {TOUCHED}"))


def record_batch(con: duckdb.DuckDBPyConnection, batch_id: str, now: datetime, w: Written) -> None:
    con.execute(
        "INSERT INTO ingested_batches VALUES ($batch, $now, $n, $ins, $dl, $users) ON CONFLICT DO NOTHING",
        {
            "batch": batch_id,
            "now": now,
            "n": w.events_in_batch,
            "ins": sum(w.inserted.values()),
            "dl": w.dead_letters,
            "users": w.users_touched,
        },
    )


@dataclass(frozen=True)
class Lateness:
    """Events that reached the store more than the allowed lateness after they occurred."""

    late_events: int
    late_days: list[str]  # their UTC days: snapshots of these days taken earlier miss them
    max_lateness_seconds: float | None


def lateness(con: duckdb.DuckDBPyConnection, now: datetime, allowed: timedelta) -> Lateness:
    late, days, worst = one(
        con,
        "SELECT count(*) FILTER (WHERE x > $allowed), "
        "list(DISTINCT strftime(occurred_at, '%Y-%m-%d') ORDER BY strftime(occurred_at, '%Y-%m-%d')) "
        "FILTER (WHERE x > $allowed), max(x) "
        f"FROM (SELECT occurred_at, epoch(CAST($now AS TIMESTAMPTZ)) - epoch(occurred_at) AS x FROM {EVENTS})",
        {"now": now, "allowed": allowed.total_seconds()},
    )
    return Lateness(int(late), list(days or [])[:31], worst)


def event_ids(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.execute(f"SELECT event_id FROM {EVENTS} ORDER BY stream_seq").fetchall()]


def latency(con: duckdb.DuckDBPyConnection, committed: datetime) -> tuple[float | None, float | None, float | None]:
    """JetStream stored time -> commit over the batch's events: p50, p95, max (None for no events)."""
    p50, p95, worst = one(
        con,
        "SELECT quantile_cont(x, 0.5), quantile_cont(x, 0.95), max(x) FROM "
        f"(SELECT epoch(CAST($c AS TIMESTAMPTZ)) - epoch(received_at) AS x FROM {EVENTS})",
        {"c": committed},
    )
    return p50, p95, worst
