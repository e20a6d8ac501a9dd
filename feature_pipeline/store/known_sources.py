"""The sources a store has read, so adding or removing one in the registry is said once, in the run that sees it.

A source added to the registry gets its raw table when the store is next opened for writing, and its
consumer on the sensor's next tick. A source removed keeps its table (its events, and every feature that
read them, are history) and its consumer stays on the server, unread, its messages waiting there.
"""

from __future__ import annotations

from datetime import datetime

import duckdb

from feature_pipeline.store.db import scalar
from feature_pipeline.store.registry import Registry

KNOWN = "known_sources"
DDL = (
    f"CREATE TABLE IF NOT EXISTS {KNOWN} (name VARCHAR PRIMARY KEY, stream VARCHAR NOT NULL, "
    "table_name VARCHAR NOT NULL, first_seen TIMESTAMPTZ NOT NULL, removed_at TIMESTAMPTZ)"
)


def changes(con: duckdb.DuckDBPyConnection, registry: Registry, now: datetime) -> list[str]:
    """Record the registry's sources; what changed since the last run, in words (nothing on a store's first
    run, or on the first run of a store made before sources were configuration)."""
    known = {r[0]: r[1:] for r in con.execute(f"SELECT name, stream, table_name, removed_at FROM {KNOWN}").fetchall()}
    out = []
    for spec in registry.event_streams:
        if spec.key not in known:
            con.execute(f"INSERT INTO {KNOWN} VALUES ($n, $s, $t, $now, NULL)", {"n": spec.key, "s": spec.name,
                        "t": spec.table, "now": now})  # fmt: skip
            if known:
                out.append(f"source {spec.key!r} added: stream {spec.name}, table {spec.table}")
        elif known[spec.key][2] is not None:
            con.execute(f"UPDATE {KNOWN} SET removed_at = NULL WHERE name = $n", {"n": spec.key})
            out.append(f"source {spec.key!r} is back: its events are read again from where its consumer stopped")
    listed = {s.key for s in registry.event_streams}
    for name, (stream, table, removed_at) in known.items():
        if name in listed or removed_at is not None:
            continue
        con.execute(f"UPDATE {KNOWN} SET removed_at = $now WHERE name = $n", {"n": name, "now": now})
        rows = scalar(con, f"SELECT count(*) FROM {table}")
        out.append(
            f"source {name!r} was removed from the feature registry: its table {table} is kept ({rows} rows) and its "
            f"consumer on stream {stream} is no longer read (its messages wait in NATS until the source is back)"
        )
    return out
