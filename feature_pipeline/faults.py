"""Fault injection for tests and drills (FEATURE_PIPELINE_FAULTS): named faults and the hooks they become.

The store and the tick know nothing of these names; they take a hook (something to call just
before COMMIT) or an option (send keep-alives or not), and this module turns names into those.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import duckdb

from feature_pipeline.store.batch import EVENTS

FAIL_RUN = "fail-run"
FAIL_MARKED = "fail-marked"
MARK = "fail-"  # FAIL_MARKED: event ids that make their batch's run fail
SLOW_COMMIT = "slow-commit"
NO_KEEPALIVE = "no-keepalive"
ARCHIVE_KILL = "archive-kill"
KILL_AFTER_COMMIT = "kill-after-commit"
SLOW_COMMIT_SECONDS = 10

FAULTS = {
    FAIL_RUN: "every ingest run fails just before COMMIT",
    FAIL_MARKED: f"an ingest run fails just before COMMIT when its batch holds an event whose id starts with {MARK!r} "
    "(a message that breaks its batch, to bisect)",
    SLOW_COMMIT: f"every ingest run waits {SLOW_COMMIT_SECONDS} s inside its transaction before COMMIT "
    "(to kill or cancel it there)",
    NO_KEEPALIVE: "the sensor sends no +WPI, so ack_wait can expire under a waiting batch",
    ARCHIVE_KILL: "`feature-pipeline archive` kills itself (SIGKILL) once its first Parquet file is on disk",
    KILL_AFTER_COMMIT: "the first ingest run that stores events kills itself (SIGKILL) after its DuckDB commit, before "
    "it writes the online store (once per store: a marker file beside it)",
}


class InjectedFault(RuntimeError):
    """Raised by FEATURE_PIPELINE_FAULTS=fail-run, for tests and drills."""


def parse(raw: str) -> frozenset[str]:
    """Comma-separated names; unknown ones are an error that lists the known ones."""
    names = frozenset(f.strip() for f in raw.split(",") if f.strip())
    unknown = names - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {sorted(FAULTS)}")
    return names


def before_commit(faults: Iterable[str]) -> Callable[[duckdb.DuckDBPyConnection], None] | None:
    """What an ingest run does inside its transaction just before COMMIT, or None for nothing."""
    chosen = set(faults)
    if not chosen & {FAIL_RUN, FAIL_MARKED, SLOW_COMMIT}:
        return None

    def hook(con: duckdb.DuckDBPyConnection) -> None:
        if SLOW_COMMIT in chosen:
            time.sleep(SLOW_COMMIT_SECONDS)
        if FAIL_RUN in chosen:
            raise InjectedFault(f"FEATURE_PIPELINE_FAULTS={FAIL_RUN}: failing before COMMIT (nothing is stored)")
        if FAIL_MARKED in chosen:
            marked = con.execute(f"SELECT min(event_id) FROM {EVENTS} WHERE starts_with(event_id, $m)", {"m": MARK})
            found = (marked.fetchone() or [None])[0]
            if found:
                raise InjectedFault(f"FEATURE_PIPELINE_FAULTS={FAIL_MARKED}: event {found} breaks this batch")

    return hook


def after_commit(
    faults: Iterable[str], store_path: str | os.PathLike[str], then: Callable[[duckdb.DuckDBPyConnection], None]
) -> Callable[[duckdb.DuckDBPyConnection], None]:
    """What an ingest run does right after its COMMIT: `then` (the online store's write), and with
    KILL_AFTER_COMMIT, first die once (a marker file beside the store) if the batch stored an event."""
    if KILL_AFTER_COMMIT not in set(faults):
        return then
    marker = Path(f"{store_path}.{KILL_AFTER_COMMIT}")

    def hook(con: duckdb.DuckDBPyConnection) -> None:
        stored = con.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()
        if stored and stored[0] and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        then(con)

    return hook
