"""What happens to each staged message once its run has ended: the settle decisions.

Pure: the tick maps the orchestrator's run status onto `RunOutcome`, asks `decide()` per
message, and carries the actions out against NATS.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

NAK_DELAY_CAP_SECONDS = 300.0


class RunOutcome(Enum):
    PENDING = "pending"  # no run yet, queued or running: keep the messages alive
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed or canceled: nothing of the batch may be acked


_DAGSTER_STATUS = {
    "NOT_STARTED": RunOutcome.PENDING,
    "QUEUED": RunOutcome.PENDING,
    "STARTING": RunOutcome.PENDING,
    "STARTED": RunOutcome.PENDING,
    "CANCELING": RunOutcome.PENDING,
    "MANAGED": RunOutcome.PENDING,
    "SUCCESS": RunOutcome.SUCCEEDED,
    "FAILURE": RunOutcome.FAILED,
    "CANCELED": RunOutcome.FAILED,
}


# STARTING: launched, but not yet running its code (a new process, or a task waiting for a warm worker).
_NOT_STARTED = frozenset({"NOT_STARTED", "QUEUED", "STARTING"})


def outcome_of(status_name: str | None) -> RunOutcome:
    """Map a Dagster `DagsterRunStatus` name (None = no run) onto what settling needs."""
    if status_name is None:
        return RunOutcome.PENDING
    return _DAGSTER_STATUS.get(status_name, RunOutcome.PENDING)


def waiting_to_start(status_name: str | None) -> bool:
    """No run yet, or one that has not started running its code (queued, or being launched)."""
    return status_name is None or status_name in _NOT_STARTED


def keep_alive_due(last_seconds: float, now_seconds: float, ack_wait_seconds: float) -> bool:
    """+WPI only once a quarter of ack_wait has passed since the first pull or the last +WPI.

    Re-arming every message of every waiting batch on every tick cost more than the fetch itself
    on large batches; a quarter of ack_wait leaves three more ticks' worth of margin.
    """
    return now_seconds - last_seconds >= ack_wait_seconds / 4


class Kind(Enum):
    ACK = "ack"
    NAK = "nak"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class Action:
    kind: Kind
    delay_seconds: float = 0.0
    reason: str = ""


ACK = Action(Kind.ACK)


def nak_delay(num_delivered: int, base_seconds: float) -> float:
    """Exponential backoff: base, 2x base, 4x base ... capped at five minutes."""
    doublings = min(max(num_delivered - 1, 0), 30)  # 2**30 x any base is past the cap; avoids overflow
    return float(min(base_seconds * 2**doublings, NAK_DELAY_CAP_SECONDS))


def decide(
    outcome: RunOutcome,
    *,
    num_delivered: int,
    max_deliver: int,
    nak_base_seconds: float,
    failure: str,
    may_dead_letter: bool = True,
) -> Action | None:
    """The settle action for one message of a batch whose run ended with `outcome`.

    None while the run is pending. Messages that are themselves dead letters
    (`may_dead_letter=False`) are never dead-lettered again, only retried.
    """
    if outcome is RunOutcome.PENDING:
        return None
    if outcome is RunOutcome.SUCCEEDED:
        return ACK
    if may_dead_letter and num_delivered >= max_deliver:
        return Action(
            Kind.DEAD_LETTER,
            reason=f"gave up after {num_delivered} deliveries (NATS_MAX_DELIVER={max_deliver}); last run: {failure}",
        )
    return Action(Kind.NAK, delay_seconds=nak_delay(num_delivered, nak_base_seconds))
