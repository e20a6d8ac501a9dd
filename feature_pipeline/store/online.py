"""The store's side of the online store: which rows changed since they were last written to the KV.

Every refresh records the users whose rows it rewrote in `online_pending`, inside the same transaction
as the rows themselves (and, before a rebuild, every user the table held, so a user who lost their row
is deleted from the KV too). After the commit, `ingest.online` writes those users' current rows to the
KV and then empties the table. A run that dies in between leaves the table as it was, and the next
sync (its retry, or any later run) writes them: the KV catches up with the store without replaying
anything, and writing a row twice writes the same value.

The rows are turned into their KV values here, in DuckDB (`to_json`), a chunk at a time: no Python loop
over columns, and no more than a chunk in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb

from feature_pipeline.store.registry import Registry

PENDING = "online_pending"
# No key: a refresh appends its users, duplicates included (an index insert per user would cost more than the
# duplicates), and the reader takes them DISTINCT.
PENDING_DDL = f"CREATE TABLE IF NOT EXISTS {PENDING} (user_id VARCHAR NOT NULL)"
ISO = "%Y-%m-%dT%H:%M:%S.%fZ"
CHUNK_ROWS = 20_000


def mark(con: duckdb.DuckDBPyConnection, users: str) -> None:
    """Record the users selected by `users` (a query of user_id) as changed, in the caller's transaction."""
    con.execute(f"INSERT INTO {PENDING} SELECT user_id FROM ({users})")


def mark_users(con: duckdb.DuckDBPyConnection, users: list[str]) -> None:
    if users:
        con.executemany(f"INSERT INTO {PENDING} VALUES (?)", [[u] for u in users])


def mark_everyone(con: duckdb.DuckDBPyConnection) -> None:
    """Every current row is to be written: a new or emptied bucket, or a store that predates the KV."""
    mark(con, "SELECT user_id FROM user_features")


def pending_count(con: duckdb.DuckDBPyConnection) -> int:
    row = con.execute(f"SELECT count(DISTINCT user_id) FROM {PENDING}").fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class Chunk:
    rows: list[tuple[str, bytes]]  # (user id, JSON value) of the users that have a row
    gone: list[str]  # users that have no row any more: their keys are deleted


def pending_values(
    con: duckdb.DuckDBPyConnection, registry: Registry, valid_as_of: datetime, chunk: int = CHUNK_ROWS
) -> Iterator[Chunk]:
    """The pending users' current rows as KV values, `chunk` at a time (see `value_sql`)."""
    cur = con.execute(
        f"SELECT p.user_id, v.value FROM (SELECT DISTINCT user_id FROM {PENDING}) p "
        f"LEFT JOIN ({value_sql(registry)}) v USING (user_id)",
        {"as_of": valid_as_of, "fp": registry.fingerprint},
    )
    while batch := cur.fetchmany(chunk):
        yield Chunk(
            [(u, v.encode()) for u, v in batch if v is not None],
            [u for u, v in batch if v is None],
        )


def sample_values(
    con: duckdb.DuckDBPyConnection, registry: Registry, valid_as_of: datetime, n: int
) -> list[tuple[str, bytes]]:
    """`n` random rows as their KV values, to read back and compare."""
    cur = con.execute(
        f"SELECT user_id, value FROM ({value_sql(registry)}) USING SAMPLE reservoir({int(n)} ROWS)",
        {"as_of": valid_as_of, "fp": registry.fingerprint},
    )
    return [(u, v.encode()) for u, v in cur.fetchall()]


def value_sql(registry: Registry, where: str = "") -> str:
    """(user_id, value): each row as the JSON object a KV value holds, every registry feature plus
    `user_id`, `updated_at`, `valid_as_of` and `fingerprint` (times as ISO 8601 UTC text)."""
    feats = "".join(f"{f.name} := {_as_text(f.name, f.column_type)}, " for f in registry.features)
    return (
        "SELECT user_id, to_json(struct_pack(user_id := user_id, "
        f"{feats}updated_at := {_as_text('updated_at', 'TIMESTAMPTZ')}, "
        f"valid_as_of := strftime(timezone('UTC', CAST($as_of AS TIMESTAMPTZ)), '{ISO}'), "
        f"fingerprint := CAST($fp AS VARCHAR)))::VARCHAR AS value FROM user_features {where}"
    )


def _as_text(column: str, column_type: str) -> str:
    """Times as ISO 8601 UTC text (to_json would write DuckDB's own format); other values as they are."""
    return f"strftime(timezone('UTC', {column}), '{ISO}')" if column_type == "TIMESTAMPTZ" else column


def clear(con: duckdb.DuckDBPyConnection) -> None:
    """Everything pending was written (the caller held the write lock throughout, so nothing was added)."""
    con.execute(f"DELETE FROM {PENDING}")


def columns(con: duckdb.DuckDBPyConnection, registry: Registry) -> dict[str, Any]:
    """The features' names and DuckDB types in registry order, for readers that have no registry file."""
    types = dict(
        con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'user_features' "
            "AND schema_name = 'main'"
        ).fetchall()
    )
    return {f.name: types.get(f.name, f.column_type) for f in registry.features}
