"""Why a batch's run failed, as settling needs it: because of the messages, or for a reason outside them.

Only a failure the messages themselves cause may spend their deliveries (the batch is bisected; a
lone failing message is NAKed, then dead-lettered after NATS_MAX_DELIVER). Anything outside their
content keeps the batch staged and kept alive, and its run is retried with backoff however long
that takes: an outage, or a bug in the code or its configuration, must never move valid events
into the dead-letter stream.

The rule, in one place:
- messages: DuckDB's data errors raised while storing the batch (a value it cannot convert or that
  is out of range, a constraint, input it rejects) and the `fail-run` / `fail-marked` drills, which
  stand for them. Storing a batch is deterministic, so such an error comes back on every retry of
  the same messages;
- outside the messages: everything else. The operating system (disk full, permissions, missing
  paths, lost connections, timeouts), memory, DuckDB's I/O, lock, transaction, catalog and binder
  errors, the one-writer lock not freed in time, NATS errors while reading the staged batch, any
  other Python error (a bug), and every run that ended without an error of its own: canceled,
  killed worker, lost run, max runtime reached (see `runs.DagsterRuns`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import duckdb

from feature_pipeline.faults import InjectedFault


class Cause(Enum):
    MESSAGES = "messages"
    INFRASTRUCTURE = "infrastructure"


@dataclass(frozen=True)
class RunFailure:
    text: str  # a line a person can read; it becomes the dead-letter reason
    cause: Cause


_MESSAGES = (
    duckdb.DataError,  # ConversionException, OutOfRangeException, TypeMismatchException
    duckdb.IntegrityError,  # ConstraintException
    duckdb.InvalidInputException,
    InjectedFault,
)


def cause_of(exc: BaseException) -> Cause:
    """The cause of an error raised while a run stored its batch (the rule in the module docstring)."""
    return Cause.MESSAGES if isinstance(exc, _MESSAGES) else Cause.INFRASTRUCTURE
