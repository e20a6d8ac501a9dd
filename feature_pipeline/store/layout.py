"""A store file's own record of the shard it holds: a file of one layout is never written as another's.

Written the first time a writer opens the file (a store made before shards existed is shard 0 of 1), and
checked every time after: a run on a host whose FEATURE_PIPELINE_SHARDS differs from the file's, or a file
renamed by hand, fails in words instead of storing users in a store that does not own them.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from feature_pipeline import shards as feature_shards

DDL = "CREATE TABLE IF NOT EXISTS store_layout (id INTEGER PRIMARY KEY, shard INTEGER, shards INTEGER, hash VARCHAR)"


def keep(con: duckdb.DuckDBPyConnection, shard: int, shards: int, path: Path) -> None:
    """Record the layout in a file that has none; raise LayoutError when the file holds another."""
    con.execute(DDL)
    row = con.execute("SELECT shard, shards, hash FROM store_layout WHERE id = 1").fetchone()
    if row is None:
        con.execute(
            "INSERT INTO store_layout VALUES (1, $k, $n, $h)", {"k": shard, "n": shards, "h": feature_shards.HASH}
        )
        return
    if tuple(row) != (shard, shards, feature_shards.HASH):
        raise feature_shards.LayoutError(
            feature_shards.refusal(shards, int(row[1]), f"{path} holds shard {row[0]} of {row[1]} ({row[2]})")
            if row[1] != shards
            else f"{path} holds shard {row[0]} of {row[1]}, but is opened as shard {shard}: was it renamed?"
        )


def recorded(con: duckdb.DuckDBPyConnection) -> tuple[int, int] | None:
    """(shard, shards) a file holds, or None for a file no writer has opened since shards existed."""
    try:
        row = con.execute("SELECT shard, shards FROM store_layout WHERE id = 1").fetchone()
    except duckdb.CatalogException:
        return None
    return None if row is None else (int(row[0]), int(row[1]))
