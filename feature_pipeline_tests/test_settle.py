"""Settle decisions: a message is acked only after its run succeeded, retried with backoff
while it fails, and dead-lettered once NATS would stop redelivering it; and which failures may spend
deliveries at all (only those the messages cause)."""

from __future__ import annotations

import duckdb
import pytest
from nats.errors import NoServersError

from feature_pipeline.faults import InjectedFault
from feature_pipeline.ingest.failures import Cause, cause_of
from feature_pipeline.ingest.settle import (
    ACK,
    NAK_DELAY_CAP_SECONDS,
    Action,
    Kind,
    RunOutcome,
    decide,
    nak_delay,
    outcome_of,
    waiting_to_start,
)
from feature_pipeline.store.db import StoreBusy

BASE = 2.0


def failed(num_delivered: int, *, max_deliver: int = 5, may_dead_letter: bool = True) -> Action | None:
    """decide() for a failed run, with the defaults the pipeline uses."""
    return decide(
        RunOutcome.FAILED,
        num_delivered=num_delivered,
        max_deliver=max_deliver,
        nak_base_seconds=BASE,
        failure="ConversionException: boom",
        may_dead_letter=may_dead_letter,
    )


@pytest.mark.parametrize("num_delivered", [1, 5, 99])
def test_success_acks(num_delivered: int) -> None:
    """A stored message is acked whatever its delivery count, even past max_deliver."""
    action = decide(RunOutcome.SUCCEEDED, num_delivered=num_delivered, max_deliver=5, nak_base_seconds=BASE, failure="")
    assert action == ACK
    assert action is not None and action.kind is Kind.ACK


@pytest.mark.parametrize("may_dead_letter", [True, False])
def test_pending_does_nothing(may_dead_letter: bool) -> None:
    """While the run is queued or running, the message must be neither acked nor NAKed."""
    action = decide(
        RunOutcome.PENDING,
        num_delivered=5,
        max_deliver=5,
        nak_base_seconds=BASE,
        failure="",
        may_dead_letter=may_dead_letter,
    )
    assert action is None


def test_failure_below_max_deliver_naks_with_doubling_delay() -> None:
    """Retries back off 1x, 2x, 4x the base so a broken store is not hammered."""
    delays = []
    for n in (1, 2, 3, 4):
        action = failed(n)
        assert action is not None
        assert action.kind is Kind.NAK
        delays.append(action.delay_seconds)
    assert delays == [BASE, 2 * BASE, 4 * BASE, 8 * BASE]


def test_nak_delay_growth_and_cap() -> None:
    """The delay doubles per delivery and never exceeds NAK_DELAY_CAP_SECONDS."""
    assert nak_delay(1, 3.0) == 3.0
    assert nak_delay(2, 3.0) == 6.0
    assert nak_delay(3, 3.0) == 12.0
    assert nak_delay(0, 3.0) == 3.0  # a count of 0 is treated as the first delivery
    assert nak_delay(10, 3.0) == NAK_DELAY_CAP_SECONDS
    assert nak_delay(8, 300.0) == NAK_DELAY_CAP_SECONDS
    assert nak_delay(5, 0.0) == 0.0


def test_failure_naks_are_capped() -> None:
    """A high delivery count with a generous max_deliver still waits at most the cap."""
    action = failed(50, max_deliver=100)
    assert action == Action(Kind.NAK, delay_seconds=NAK_DELAY_CAP_SECONDS)


def test_failure_at_max_deliver_dead_letters_with_reason() -> None:
    """On the last delivery NATS would drop the message: it must be dead-lettered with a reason a person can act on."""
    action = failed(5, max_deliver=5)
    assert action is not None
    assert action.kind is Kind.DEAD_LETTER
    assert "5 deliveries" in action.reason
    assert "NATS_MAX_DELIVER=5" in action.reason
    assert "ConversionException: boom" in action.reason


def test_failure_past_max_deliver_dead_letters() -> None:
    """A count above max_deliver (the setting was lowered) still dead-letters rather than NAKs forever."""
    action = failed(7, max_deliver=5)
    assert action is not None and action.kind is Kind.DEAD_LETTER
    assert "7 deliveries" in action.reason


def test_failure_just_below_max_deliver_still_naks() -> None:
    """Off-by-one guard: delivery max_deliver-1 gets one more try."""
    action = failed(4, max_deliver=5)
    assert action is not None and action.kind is Kind.NAK


@pytest.mark.parametrize("num_delivered", [1, 5, 6, 100])
def test_dead_letters_are_never_dead_lettered_again(num_delivered: int) -> None:
    """A message from the DEADLETTER stream is retried, never copied to DEADLETTER again."""
    action = failed(num_delivered, max_deliver=5, may_dead_letter=False)
    assert action is not None
    assert action.kind is Kind.NAK
    assert action.delay_seconds == nak_delay(num_delivered, BASE)


def test_unbounded_redeliveries_of_a_dead_letter_do_not_crash() -> None:
    """The DEADLETTER consumer has max_deliver=-1, so its delivery count grows without bound while runs fail."""
    action = failed(1100, max_deliver=5, may_dead_letter=False)
    assert action == Action(Kind.NAK, delay_seconds=NAK_DELAY_CAP_SECONDS)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("SUCCESS", RunOutcome.SUCCEEDED),
        ("FAILURE", RunOutcome.FAILED),
        ("CANCELED", RunOutcome.FAILED),
        ("QUEUED", RunOutcome.PENDING),
        ("STARTED", RunOutcome.PENDING),
        ("NOT_STARTED", RunOutcome.PENDING),
        ("STARTING", RunOutcome.PENDING),
        ("CANCELING", RunOutcome.PENDING),
        ("MANAGED", RunOutcome.PENDING),
        (None, RunOutcome.PENDING),
    ],
)
def test_outcome_of_dagster_status(status: str | None, outcome: RunOutcome) -> None:
    """Only SUCCESS may ack; CANCELING is not yet ended, so it must not settle anything."""
    assert outcome_of(status) is outcome


def test_outcome_of_unknown_status_is_pending() -> None:
    """A status added by a future Dagster must keep messages alive rather than ack or NAK them."""
    assert outcome_of("SOMETHING_NEW") is RunOutcome.PENDING


def test_outcome_of_covers_every_dagster_status() -> None:
    """No status of the installed Dagster other than SUCCESS may ever lead to an ack."""
    dagster = pytest.importorskip("dagster")
    for status in dagster.DagsterRunStatus:
        expected = RunOutcome.SUCCEEDED if status.name == "SUCCESS" else None
        if expected is None:
            assert outcome_of(status.name) is not RunOutcome.SUCCEEDED, status.name
        else:
            assert outcome_of(status.name) is expected


@pytest.mark.parametrize(
    ("status", "waiting"),
    [
        (None, True),
        ("NOT_STARTED", True),
        ("QUEUED", True),
        ("STARTING", True),
        ("STARTED", False),
        ("SUCCESS", False),
        ("FAILURE", False),
        ("CANCELED", False),
    ],
)
def test_a_run_that_has_not_started_its_code_holds_new_batches_back(status: str | None, waiting: bool) -> None:
    """Launched but not running yet (a task waiting for a warm worker) counts as waiting, like queued."""
    assert waiting_to_start(status) is waiting


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (OSError(28, "No space left on device"), Cause.INFRASTRUCTURE),
        (PermissionError("denied"), Cause.INFRASTRUCTURE),
        (FileExistsError("a file where the folder should be"), Cause.INFRASTRUCTURE),
        (TimeoutError(), Cause.INFRASTRUCTURE),
        (MemoryError(), Cause.INFRASTRUCTURE),
        (StoreBusy("held for 120 s"), Cause.INFRASTRUCTURE),
        (duckdb.IOException("IO Error: No space left on device"), Cause.INFRASTRUCTURE),
        (duckdb.OutOfMemoryException("out of memory"), Cause.INFRASTRUCTURE),
        (duckdb.TransactionException("conflict"), Cause.INFRASTRUCTURE),
        (duckdb.FatalException("database invalidated"), Cause.INFRASTRUCTURE),
        (NoServersError(), Cause.INFRASTRUCTURE),
        (duckdb.ConversionException("could not convert"), Cause.MESSAGES),
        (duckdb.ConstraintException("constraint"), Cause.MESSAGES),
        (duckdb.InvalidInputException("bad input"), Cause.MESSAGES),
        (InjectedFault("fail-run"), Cause.MESSAGES),
        (duckdb.OutOfRangeException("out of range"), Cause.MESSAGES),
        (duckdb.BinderException("a feature refers to a column that is not there"), Cause.INFRASTRUCTURE),
        (duckdb.CatalogException("no such table"), Cause.INFRASTRUCTURE),
        (ValueError("a bug"), Cause.INFRASTRUCTURE),
        (KeyError("a bug"), Cause.INFRASTRUCTURE),
    ],
)
def test_only_errors_the_messages_cause_spend_deliveries(error: BaseException, cause: Cause) -> None:
    assert cause_of(error) is cause
