"""Why a batch's run failed, as settling needs it: because of the messages, or because of where it ran.

Only a failure the messages themselves cause may spend their deliveries (NAK, then dead letter after
NATS_MAX_DELIVER). Anything outside their content keeps the batch staged and kept alive, and its run is
retried with backoff, however long the outage lasts: an outage must never move valid events into the
dead-letter stream.

The rule, in one place:
- infrastructure: the operating system (OSError: disk full, permissions, missing paths, lost
  connections, timeouts), memory, DuckDB's I/O, lock, transaction and fatal errors, the one-writer
  lock not freed in time, NATS errors while reading the staged batch, and every run that ended without
  an error of its own (canceled, killed worker, lost run, max runtime reached: see `runs.DagsterRuns`);
- messages: any other error raised while storing the batch (a value DuckDB cannot convert, a
  constraint, an error in the feature SQL for this data, the `fail-run` drill). Storing a batch is
  deterministic, so such an error comes back on every retry of the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import duckdb

from feature_pipeline.store.db import StoreBusy


class Cause(Enum):
    MESSAGES = "messages"
    INFRASTRUCTURE = "infrastructure"


@dataclass(frozen=True)
class RunFailure:
    text: str  # a line a person can read; it becomes the dead-letter reason
    cause: Cause


_INFRASTRUCTURE = (
    OSError,
    MemoryError,
    StoreBusy,
    duckdb.OperationalError,  # IOException, OutOfMemoryException, TransactionException
    duckdb.FatalException,
    duckdb.InterruptException,
    duckdb.PermissionException,
)


def cause_of(exc: BaseException) -> Cause:
    """The cause of an error raised while a run stored its batch (the rule in the module docstring)."""
    if isinstance(exc, _INFRASTRUCTURE) or type(exc).__module__.split(".")[0] == "nats":
        return Cause.INFRASTRUCTURE
    return Cause.MESSAGES
