"""The steps that store one staged batch, each a statement or two inside the caller's transaction.

Idempotent: events are keyed by id across every stream (a redelivered or duplicated event is
absorbed), dead letters by original stream and sequence. An id seen again with other content, or on
another stream, is recorded in dead_letters, not merged: the first stored version stays.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import duckdb

from feature_pipeline import streams
from feature_pipeline.store.archive import archived_copies
from feature_pipeline.store.db import one, scalar
from feature_pipeline.store.intake import STAGED, STAGED_DEAD_LETTERS
from feature_pipeline.store.schema import content_digest
from feature_pipeline.streams import StreamSpec

EVENTS = "batch_events"  # temp table: the batch's events, one row per (stream, event id)
TOUCHED = "touched_users"  # temp table: the users of the batch's events
FRESH = "fresh_ids"  # temp table: the batch's ids that were not stored before
REPEATS = "repeated_copies"  # temp table: the batch's copies that were not stored (redeliveries, duplicates)
STORED = "stored_versions"  # temp table: event_index rows of the repeated ids
_IN_LIST = 20  # ids per constant IN list: small enough for DuckDB to answer from the index
_INDEX_LOOKUP_MAX = 2000  # more repeated ids than this: one scan is cheaper than many lookups


@dataclass(frozen=True)
class StagedFiles:
    """The Parquet file of one staged batch: its messages as they were pulled (see `ingest.staging`)."""

    folder: Path

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


def write(
    con: duckdb.DuckDBPyConnection, files: StagedFiles, batch_id: str, now: datetime, sources: Sequence[StreamSpec]
) -> Written:
    """Every write of the batch except the feature refresh, in order, from what `intake.load` made of it."""
    events_in_batch = load_events(con)
    inserted = insert_events(con, batch_id, now, sources)
    dead = insert_dead_letters(con, batch_id, now)
    conflicts = record_conflicting_duplicates(con, files, batch_id, now)
    touched = touch_users(con)
    written = Written(events_in_batch, inserted, dead, conflicts, touched)
    record_batch(con, batch_id, now, written)
    return written


def load_events(con: duckdb.DuckDBPyConnection) -> int:
    """The batch's events into a temp table, one per id (the first the streams stored); returns how many
    the batch held."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {EVENTS} AS SELECT * FROM {STAGED} "
        "QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY received_at, stream, stream_seq) = 1"
    )
    return int(scalar(con, f"SELECT count(*) FROM {STAGED}"))


def insert_events(
    con: duckdb.DuckDBPyConnection, batch_id: str, now: datetime, sources: Sequence[StreamSpec]
) -> dict[str, int]:
    """New ids into event_index and their stream's table; the rows stored are kept in `new_<stream key>`
    temp tables, which the feature refresh merges (a redelivered event is in none of them)."""
    archived_copies(con, EVENTS)
    with warnings.catch_warnings():  # "an extra copy of the rows": one id column, and INSERT must run once
        warnings.simplefilter("ignore", UserWarning)
        fresh = con.execute(
            f"INSERT INTO event_index SELECT event_id, stream, stream_seq, subject, occurred_at, "
            f"{content_digest('b')} FROM {EVENTS} b ON CONFLICT DO NOTHING RETURNING event_id"
        ).to_arrow_table()
    con.register("fresh_ids_returned", fresh)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {FRESH} AS SELECT event_id FROM fresh_ids_returned")
    finally:
        con.unregister("fresh_ids_returned")
    inserted = {}
    for spec in sources:
        new = new_table(spec.key)
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {new} AS SELECT event_id, subject, stream_seq, occurred_at, received_at, "
            f"CAST($now AS TIMESTAMPTZ) AS ingested_at, user_id, type, schema_version, CAST(data AS JSON) AS data, "
            f"known_type, CAST($batch AS VARCHAR) AS batch_id FROM {EVENTS} "
            f"WHERE stream = $stream AND event_id IN (SELECT event_id FROM {FRESH})",
            {"now": now, "batch": batch_id, "stream": spec.name},
        )
        inserted[spec.name] = int(scalar(con, f"INSERT INTO {spec.table} SELECT * FROM {new}"))
    return inserted


def new_table(key: str) -> str:
    """The temp table of the rows a batch added to a stream's raw table."""
    return f"new_{key}"


def insert_dead_letters(con: duckdb.DuckDBPyConnection, batch_id: str, now: datetime) -> int:
    return int(
        scalar(
            con,
            f"INSERT INTO {streams.DEADLETTER.table} SELECT original_stream, original_subject, original_seq, "
            f"delivery_count, reason, dead_lettered_at, deadletter_seq, body, $now, $batch FROM {STAGED_DEAD_LETTERS} "
            "QUALIFY row_number() OVER (PARTITION BY original_stream, original_seq ORDER BY deadletter_seq) = 1 "
            "ON CONFLICT DO NOTHING",
            {"now": now, "batch": batch_id},
        )
    )


def record_conflicting_duplicates(
    con: duckdb.DuckDBPyConnection, files: StagedFiles, batch_id: str, now: datetime
) -> int:
    """An id seen again with other content, or on another stream, is not absorbed silently: the first
    stored version stays, each other version goes to dead_letters with its body and both sequences in
    the reason (deadletter_seq 0: recorded by the run, not republished on DEADLETTER).

    Only the batch's copies that were not stored are looked up in event_index (usually none)."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {REPEATS} AS SELECT * FROM {STAGED} b "
        f"WHERE NOT EXISTS (SELECT 1 FROM {EVENTS} k WHERE k.stream = b.stream AND k.stream_seq = b.stream_seq "
        f"AND k.event_id IN (SELECT event_id FROM {FRESH}))"
    )
    ids = [r[0] for r in con.execute(f"SELECT DISTINCT event_id FROM {REPEATS}").fetchall()]
    if not ids:
        return 0
    stored = _lookup_index(con, ids)
    return int(
        scalar(
            con,
            f"""
            INSERT INTO {streams.DEADLETTER.table}
            SELECT b.stream, b.subject, b.stream_seq, b.num_delivered,
                   CASE WHEN b.stream = x.stream
                        THEN 'duplicate id ' || b.event_id || ' with different content; kept the first '
                             || 'stored version (' || x.stream || ' #' || x.stream_seq || ')'
                        ELSE 'id ' || b.event_id || ' is already used by ' || x.subject || ' ('
                             || x.stream || ' #' || x.stream_seq || '); ids must be unique across streams; '
                             || 'kept the first stored version'
                   END,
                   $now, 0, d.body, $now, $batch
            FROM {REPEATS} b
            JOIN {stored} x ON x.event_id = b.event_id
            LEFT JOIN read_parquet($deliveries) d ON d.stream = b.stream AND d.stream_seq = b.stream_seq
            WHERE (b.stream <> x.stream OR b.stream_seq <> x.stream_seq)
              AND (b.stream <> x.stream OR x.content <> {content_digest("b")})
            ON CONFLICT DO NOTHING
            """,
            {"now": now, "batch": batch_id, "deliveries": files.deliveries},
        )
    )


def _lookup_index(con: duckdb.DuckDBPyConnection, ids: list[str]) -> str:
    """The event_index rows of `ids`, in a temp table. A short constant IN list is answered from the
    index; a long one (a mass redelivery) scans event_index once."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {STORED} AS SELECT * FROM event_index LIMIT 0")
    if len(ids) > _INDEX_LOOKUP_MAX:
        con.execute(
            f"INSERT INTO {STORED} SELECT * FROM event_index WHERE event_id IN (SELECT unnest($ids))", {"ids": ids}
        )
        return STORED
    for i in range(0, len(ids), _IN_LIST):
        chunk = ", ".join("'" + x.replace("'", "''") + "'" for x in ids[i : i + _IN_LIST])
        con.execute(f"INSERT INTO {STORED} SELECT * FROM event_index WHERE event_id IN ({chunk})")
    return STORED


def touch_users(con: duckdb.DuckDBPyConnection) -> int:
    con.execute(f"CREATE OR REPLACE TEMP TABLE {TOUCHED} AS SELECT DISTINCT user_id FROM {EVENTS}")
    return int(scalar(con, f"SELECT count(*) FROM {TOUCHED}"))


def record_batch(con: duckdb.DuckDBPyConnection, batch_id: str, now: datetime, w: Written) -> None:
    con.execute(
        "INSERT INTO ingested_batches (batch_id, committed_at, events_in_batch, events_inserted, "
        "dead_letters_inserted, users_touched) VALUES ($batch, $now, $n, $ins, $dl, $users) ON CONFLICT DO NOTHING",
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
