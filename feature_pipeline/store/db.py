"""DuckDB connections: waiting for the one-writer lock, the transaction boundary, and small query helpers.

DuckDB allows one read-write process per file. Runs are serialised by the Dagster pool `duckdb`;
another process that holds the file briefly (the CLI, a notebook) is waited for, not failed on.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb


class StoreBusy(RuntimeError):
    """Another process held the DuckDB file for longer than we were willing to wait."""


def open_file(path: Path, *, read_only: bool, wait_seconds: float) -> duckdb.DuckDBPyConnection:
    """Open the file, waiting (with backoff) while another process holds its lock."""
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    elif not path.exists():
        raise FileNotFoundError(f"no feature store at {path} yet (no batch has been ingested)")
    deadline = time.monotonic() + wait_seconds
    pause = 0.05
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise StoreBusy(f"could not open {path} within {wait_seconds:.0f} s: {exc}") from None
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
    if not read_only:
        os.chmod(path, 0o600)
    # Naive timestamps (training labels, CLI arguments) mean UTC, whatever the process's TZ is.
    con.execute("SET TimeZone = 'UTC'")
    return con


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN; COMMIT when the block ends; ROLLBACK (and re-raise) if anything in it fails."""
    con.execute("BEGIN")
    try:
        yield con
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def one(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> tuple[Any, ...]:
    """The single row a query returns (aggregates always return one)."""
    row = con.execute(sql, params or {}).fetchone()
    if row is None:
        raise RuntimeError(f"expected one row from: {sql}")
    return tuple(row)


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> Any:
    return one(con, sql, params)[0]
