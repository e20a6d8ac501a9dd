"""The store's side of the online store: the rows changed since they were last written to the KV, as KV values.

Every refresh appends the rows it rewrote to `online_pending`, already as the JSON values the KV holds,
inside the same transaction as the rows themselves (a rebuild first appends a deletion for every user
the table held, so a user who lost their row is deleted from the KV too). After the commit,
`ingest.online` writes the newest value of each pending user and then empties the table. A run that
dies in between leaves the table as it was, and the next sync (its retry, or any later run) writes
them: the KV catches up with the store without replaying anything, and writing a value twice writes
the same value.

Values are made here, in DuckDB (`to_json`), from the refresh's own temp table of changed rows: a run
never scans user_features for them, so its cost follows the rows it changed, not the number of users.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import duckdb

from feature_pipeline.store.registry import Registry

PENDING = "online_pending"
CHECK = "online_check_state"
ONLINE_DDL = [
    "CREATE SEQUENCE IF NOT EXISTS online_seq",
    # No key: appends are cheap, and the newest value of each user (by seq) is the one written. value NULL:
    # the user has no row any more.
    f"CREATE TABLE IF NOT EXISTS {PENDING} (seq BIGINT NOT NULL, user_id VARCHAR NOT NULL, value VARCHAR)",
    f"""CREATE TABLE IF NOT EXISTS {CHECK} (
        id INTEGER PRIMARY KEY,
        checked_at TIMESTAMPTZ NOT NULL,
        compared BIGINT NOT NULL,
        different VARCHAR[] NOT NULL
    )""",
]
ISO = "%Y-%m-%dT%H:%M:%S.%fZ"
CHUNK_ROWS = 20_000


def value_sql(registry: Registry, source: str = "user_features") -> str:
    """(user_id, value) of every row of `source` (user_features, or a table of its shape): the JSON object a KV
    value holds, every registry feature plus `user_id`, `updated_at`, `valid_as_of` (the parameter $as_of)
    and `fingerprint` ($fp), times as ISO 8601 UTC text."""
    feats = "".join(f"{f.name} := {_as_text(f.name, f.column_type)}, " for f in registry.features)
    return (
        "SELECT user_id, to_json(struct_pack(user_id := user_id, "
        f"{feats}updated_at := {_as_text('updated_at', 'TIMESTAMPTZ')}, "
        f"valid_as_of := {_as_text('CAST($as_of AS TIMESTAMPTZ)', 'TIMESTAMPTZ')}, "
        f"fingerprint := CAST($fp AS VARCHAR)))::VARCHAR AS value FROM {source}"
    )


def _as_text(column: str, column_type: str) -> str:
    """Times as ISO 8601 UTC text (to_json would write DuckDB's own format); other values as they are."""
    return f"strftime(timezone('UTC', {column}), '{ISO}')" if column_type == "TIMESTAMPTZ" else column


def mark_rows(con: duckdb.DuckDBPyConnection, registry: Registry, source: str, as_of: datetime) -> None:
    """Append the rows of `source` (the refresh's changed rows) as pending values, in the caller's transaction."""
    con.execute(
        f"INSERT INTO {PENDING} SELECT nextval('online_seq'), user_id, value FROM ({value_sql(registry, source)})",
        {"as_of": as_of, "fp": registry.fingerprint},
    )


def mark_all_deleted(con: duckdb.DuckDBPyConnection) -> None:
    """Before a rebuild: every user is deleted from the KV unless the rebuild writes them a row."""
    con.execute(f"INSERT INTO {PENDING} SELECT nextval('online_seq'), user_id, NULL FROM user_features")


def mark_users(con: duckdb.DuckDBPyConnection, registry: Registry, users: list[str], as_of: datetime) -> None:
    """These users' current rows (or deletions, for users without one) are to be written again."""
    if not users:
        return
    con.execute(
        f"INSERT INTO {PENDING} SELECT nextval('online_seq'), w.u, v.value FROM unnest(CAST($users AS VARCHAR[])) "
        f"w(u) LEFT JOIN ({value_sql(registry)} WHERE user_id IN (SELECT unnest(CAST($users AS VARCHAR[])))) v "
        "ON v.user_id = w.u",
        {"users": users, "as_of": as_of, "fp": registry.fingerprint},
    )


@dataclass(frozen=True)
class Chunk:
    rows: list[tuple[str, bytes]]  # (user id, JSON value) of the users that have a row
    gone: list[str]  # users that have no row any more: their keys are deleted


def pending_values(con: duckdb.DuckDBPyConnection, chunk: int = CHUNK_ROWS) -> Iterator[Chunk]:
    """The newest pending value of each user, `chunk` users at a time."""
    cur = con.execute(
        f"SELECT user_id, value FROM {PENDING} QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY seq DESC) = 1"
    )
    return _chunks(cur, chunk)


def every_value(
    con: duckdb.DuckDBPyConnection, registry: Registry, as_of: datetime, chunk: int = CHUNK_ROWS
) -> Iterator[Chunk]:
    """Every row of user_features as its value: for a new or emptied bucket, or a store older than the KV."""
    return _chunks(con.execute(value_sql(registry), {"as_of": as_of, "fp": registry.fingerprint}), chunk)


def _chunks(cur: duckdb.DuckDBPyConnection, chunk: int) -> Iterator[Chunk]:
    while batch := cur.fetchmany(chunk):
        yield Chunk([(u, v.encode()) for u, v in batch if v is not None], [u for u, v in batch if v is None])


def clear(con: duckdb.DuckDBPyConnection) -> None:
    """Everything pending was written (the caller held the write lock throughout, so nothing was added)."""
    con.execute(f"DELETE FROM {PENDING}")


def sample_values(
    con: duckdb.DuckDBPyConnection, registry: Registry, as_of: datetime, n: int
) -> list[tuple[str, bytes]]:
    """`n` random rows as their values, to read back and compare: the ids are sampled first, so only the
    sample is turned into JSON."""
    cur = con.execute(
        f"{value_sql(registry)} WHERE user_id IN (SELECT user_id FROM user_features USING SAMPLE reservoir({int(n)} "
        "ROWS))",
        {"as_of": as_of, "fp": registry.fingerprint},
    )
    return [(u, v.encode()) for u, v in cur.fetchall()]


def last_check(con: duckdb.DuckDBPyConnection, every_seconds: float) -> tuple[datetime, int, list[str]] | None:
    """The last comparison while it is younger than `every_seconds` (None: make one now)."""
    if every_seconds <= 0:
        return None
    row = con.execute(
        f"SELECT checked_at, compared, different FROM {CHECK} WHERE id = 1 AND checked_at > now() - to_seconds($s)",
        {"s": every_seconds},
    ).fetchone()
    return None if row is None else (row[0], int(row[1]), list(row[2]))


def record_check(con: duckdb.DuckDBPyConnection, at: datetime, compared: int, different: list[str]) -> None:
    con.execute(f"INSERT OR REPLACE INTO {CHECK} VALUES (1, $at, $n, $d)", {"at": at, "n": compared, "d": different})


def columns(con: duckdb.DuckDBPyConnection, registry: Registry) -> dict[str, str]:
    """The features' names and DuckDB types in registry order, for readers that have no registry file."""
    types = dict(
        con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'user_features' "
            "AND schema_name = 'main'"
        ).fetchall()
    )
    return {f.name: str(types.get(f.name, f.column_type)) for f in registry.features}
