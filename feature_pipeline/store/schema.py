"""The store's tables: raw events per stream (from the stream table), dead letters, batches, and the
feature tables, whose columns follow the registry."""

from __future__ import annotations

import duckdb

from feature_pipeline import streams
from feature_pipeline.store.archive import ARCHIVE_DDL, view_ddl
from feature_pipeline.store.incremental import DISTINCT_DDL, PARTIALS_STATE_DDL
from feature_pipeline.store.known_sources import DDL as KNOWN_SOURCES_DDL
from feature_pipeline.store.online import ONLINE_DDL
from feature_pipeline.store.registry import Registry

RAW_COLUMNS = """
    event_id VARCHAR NOT NULL,
    subject VARCHAR NOT NULL,
    stream_seq BIGINT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    ingested_at TIMESTAMPTZ NOT NULL,
    user_id VARCHAR NOT NULL,
    type VARCHAR NOT NULL,
    schema_version INTEGER NOT NULL,
    data JSON NOT NULL,
    known_type BOOLEAN NOT NULL,
    batch_id VARCHAR NOT NULL
"""
STATE_DDL = """
CREATE TABLE IF NOT EXISTS feature_state (
    id INTEGER PRIMARY KEY,
    valid_as_of TIMESTAMPTZ,
    fingerprint VARCHAR
)
"""
DEAD_LETTERS_DDL = f"""
CREATE TABLE IF NOT EXISTS {streams.DEADLETTER.table} (
    original_stream VARCHAR NOT NULL,
    original_subject VARCHAR NOT NULL,
    original_seq BIGINT NOT NULL,
    delivery_count INTEGER NOT NULL,
    reason VARCHAR NOT NULL,
    dead_lettered_at TIMESTAMPTZ NOT NULL,
    deadletter_seq BIGINT NOT NULL,
    body BLOB,
    recorded_at TIMESTAMPTZ NOT NULL,
    batch_id VARCHAR NOT NULL,
    PRIMARY KEY (original_stream, original_seq)
)
"""
BATCHES_DDL = """
CREATE TABLE IF NOT EXISTS ingested_batches (
    batch_id VARCHAR PRIMARY KEY,
    committed_at TIMESTAMPTZ NOT NULL,
    events_in_batch BIGINT NOT NULL,
    events_inserted BIGINT NOT NULL,
    dead_letters_inserted BIGINT NOT NULL,
    users_touched BIGINT NOT NULL
)
"""
# Every stored event id, whatever its stream: the one index a batch's ids are checked against (one
# ART lookup per id, not a scan of the raw tables), with what a later copy is compared to: the stream,
# sequence and subject of the stored version and a digest of its content.
EVENT_INDEX_DDL = """
CREATE TABLE IF NOT EXISTS event_index (
    event_id VARCHAR PRIMARY KEY,
    stream VARCHAR NOT NULL,
    stream_seq BIGINT NOT NULL,
    subject VARCHAR NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    content VARCHAR NOT NULL
)
"""
# Each batch's p95 publish→commit, written right after its commit (stores made before it get the column).
BATCH_LATENCY_DDL = "ALTER TABLE ingested_batches ADD COLUMN IF NOT EXISTS latency_p95_seconds DOUBLE"
# The last comparison of sampled rows with the whole-history reference.
CONSISTENCY_DDL = """
CREATE TABLE IF NOT EXISTS consistency_state (
    id INTEGER PRIMARY KEY,
    checked_at TIMESTAMPTZ NOT NULL,
    rows_checked BIGINT NOT NULL,
    inconsistent VARCHAR[] NOT NULL,
    fingerprint VARCHAR NOT NULL
)
"""


REDRIVES_DDL = """
CREATE TABLE IF NOT EXISTS redrives (
    original_stream VARCHAR NOT NULL,
    original_seq BIGINT NOT NULL,
    original_subject VARCHAR NOT NULL,
    dead_letter_reason VARCHAR NOT NULL,
    redriven_at TIMESTAMPTZ NOT NULL,
    new_seq BIGINT NOT NULL,
    PRIMARY KEY (original_stream, original_seq)
)
"""
USER_FEATURES_FIXED = frozenset({"user_id", "updated_at"})
SNAPSHOTS_FIXED = frozenset({"snapshot_date", "user_id", "as_of"})


def raw_ddl(table: str) -> str:
    """A raw table has no key of its own (event_index holds the ids): rows are appended in arrival
    order, so occurred_at ranges prune by row group. Stores made before event_index keep their key."""
    return f"CREATE TABLE IF NOT EXISTS {table} ({RAW_COLUMNS})"


def content_digest(alias: str) -> str:
    """What makes two copies of an id the same event: user, type, occurred_at and payload."""
    a = alias
    return (
        f"md5(concat_ws(chr(31), {a}.user_id, {a}.type, CAST(epoch_us({a}.occurred_at) AS VARCHAR), "
        f"CAST({a}.data AS VARCHAR)))"
    )


def index_existing_events(con: duckdb.DuckDBPyConnection, registry: Registry) -> None:
    """Fill event_index from the raw tables once, for a store made before it existed."""
    if con.execute("SELECT 1 FROM event_index LIMIT 1").fetchone() is not None:
        return
    for spec in registry.event_streams:
        con.execute(
            f"INSERT INTO event_index SELECT e.event_id, $stream, e.stream_seq, e.subject, e.occurred_at, "
            f"{content_digest('e')} FROM {spec.table} e ON CONFLICT DO NOTHING",
            {"stream": spec.name},
        )


def ddl(registry: Registry) -> list[str]:
    """Every table, created when missing (feature columns are kept in step by `sync_columns`)."""
    raw = [raw_ddl(s.table) for s in registry.event_streams]
    raw += [*ARCHIVE_DDL, *(view_ddl(s.table, [], replace=False) for s in registry.event_streams)]
    tables = [STATE_DDL, DEAD_LETTERS_DDL, BATCHES_DDL, EVENT_INDEX_DDL, CONSISTENCY_DDL, REDRIVES_DDL]
    tables += [DISTINCT_DDL, PARTIALS_STATE_DDL, BATCH_LATENCY_DDL, *ONLINE_DDL, KNOWN_SOURCES_DDL]
    return [*raw, *tables, user_features_ddl(registry), snapshots_ddl(registry)]


def user_features_ddl(registry: Registry) -> str:
    cols = "".join(f"    {f.name} {f.column_type},\n" for f in registry.features)
    return (
        "CREATE TABLE IF NOT EXISTS user_features (\n    user_id VARCHAR PRIMARY KEY,\n"
        f"{cols}    updated_at TIMESTAMPTZ NOT NULL\n)"
    )


def snapshots_ddl(registry: Registry) -> str:
    cols = "".join(f"    {f.name} {f.column_type},\n" for f in registry.features)
    # No primary key: a partition is replaced by DELETE + INSERT in one transaction.
    return (
        "CREATE TABLE IF NOT EXISTS user_feature_snapshots (\n    snapshot_date DATE NOT NULL,\n"
        f"    user_id VARCHAR NOT NULL,\n{cols}    as_of TIMESTAMPTZ NOT NULL\n)"
    )


def sync_columns(con: duckdb.DuckDBPyConnection, registry: Registry, table: str, fixed: frozenset[str]) -> list[str]:
    """Add the registry's new columns to `table`, drop the removed ones, retype changed ones.

    Returns what changed, in words, for the run log. Columns in `fixed` are not features.
    """
    have = {
        name: typ
        for name, typ in con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = $t AND schema_name = 'main'",
            {"t": table},
        ).fetchall()
    }
    want = {f.name: f.column_type for f in registry.features}
    changes: list[str] = []
    retyped: set[str] = set()
    for name, typ in list(have.items()):
        if name in fixed or (name in want and _norm(typ) == want[name]):
            continue
        con.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
        del have[name]
        if name in want:
            retyped.add(name)
            changes.append(f"retyped {table}.{name} {typ} -> {want[name]}")
        else:
            changes.append(f"dropped {table}.{name}")
    for name, typ in want.items():
        if name not in have:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {typ}")
            if name not in retyped:
                changes.append(f"added {table}.{name} {typ}")
    return changes


def _norm(sql_type: str) -> str:
    return {"TIMESTAMP WITH TIME ZONE": "TIMESTAMPTZ"}.get(sql_type, sql_type)
