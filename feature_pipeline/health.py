"""Per-stream figures and how they are graded: the lag and oldest-unacked checks, pure.

The figures are read from JetStream by `broker.stats`; the sensors, the on-demand check and
`feature-pipeline health` all grade them here, against the same thresholds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Literal

from feature_pipeline.settings import Settings


@dataclass(frozen=True)
class StreamStats:
    stream: str
    consumer: str
    consumer_lag: int
    num_pending: int
    num_ack_pending: int
    num_redelivered: int
    stream_messages: int
    last_message_at: datetime | None
    in_flight_batches: int
    in_flight_messages: int
    dead_letters: int  # copies of this stream's messages in DEADLETTER
    oldest_unacked_age_seconds: float  # 0 when caught up

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["last_message_at"] = self.last_message_at.isoformat() if self.last_message_at else None
        out["seconds_since_last_message"] = (
            round(time.time() - self.last_message_at.timestamp(), 3) if self.last_message_at else None
        )
        return out


Grade = Literal["pass", "warn", "error"]
LAG_CHECK = "consumer_lag"
AGE_CHECK = "oldest_unacked_age"


@dataclass(frozen=True)
class Thresholds:
    lag_warn: int
    lag_error: int
    oldest_warn_seconds: float
    oldest_error_seconds: float


def grade(value: float, warn: float, error: float) -> Grade:
    return "error" if value > error else "warn" if value > warn else "pass"


@dataclass(frozen=True)
class CheckOutcome:
    stream: str
    check: str
    grade: Grade
    value: float
    description: str


def stream_checks(stats: list[StreamStats], t: Thresholds) -> list[CheckOutcome]:
    """The lag and oldest-unacked checks of every stream, graded against the thresholds."""
    out = []
    for s in stats:
        g = grade(s.consumer_lag, t.lag_warn, t.lag_error)
        out.append(
            CheckOutcome(
                s.stream,
                LAG_CHECK,
                g,
                s.consumer_lag,
                f"{s.consumer_lag} messages not yet acked on {s.consumer} (warn above {t.lag_warn}, "
                f"error above {t.lag_error})",
            )
        )
        age = s.oldest_unacked_age_seconds
        g = grade(age, t.oldest_warn_seconds, t.oldest_error_seconds)
        out.append(
            CheckOutcome(
                s.stream,
                AGE_CHECK,
                g,
                round(age, 3),
                f"oldest message not yet acked is {age:.0f} s old (warn above {t.oldest_warn_seconds:.0f} s, "
                f"error above {t.oldest_error_seconds:.0f} s)",
            )
        )
    return out


def thresholds(settings: Settings) -> Thresholds:
    return Thresholds(
        settings.lag_warn,
        settings.lag_error,
        settings.oldest_unacked_warn_seconds,
        settings.oldest_unacked_error_seconds,
    )


# -- is ingest running? -----------------------------------------------------------------------------

INGEST_CHECK = "ingest_running"
INGEST_SENSOR = "ingest_sensor"
TICK_STALE_SECONDS = 120  # a running sensor whose last completed tick is older than this is not ingesting


@dataclass(frozen=True)
class SensorState:
    """What the Dagster instance says of the ingest sensor."""

    running: bool
    last_tick_at: datetime | None  # the last tick that completed (requested runs or skipped), None: never
    last_failure: str | None = None  # the error of the last tick, when it failed


def ingest_grade(
    state: SensorState | None, now: datetime, sensor: str = INGEST_SENSOR
) -> tuple[Grade, str, float | None]:
    """(grade, description, seconds since the last completed tick) of the ingest_running check."""
    if state is None:
        return "pass", f"{sensor} has not ticked yet", None
    age = (now - state.last_tick_at).total_seconds() if state.last_tick_at else None
    last = f"{state.last_tick_at:%Y-%m-%d %H:%M:%S} UTC" if state.last_tick_at else "never"
    if not state.running:
        return "error", f"{sensor} is STOPPED since {last} (its last tick): nothing is fetched or acked", age
    if age is None or age > TICK_STALE_SECONDS:
        why = f"; its last tick failed: {state.last_failure}" if state.last_failure else ""
        return (
            "error",
            f"{sensor} is RUNNING but its last completed tick was {last}, more than {TICK_STALE_SECONDS} s ago{why}",
            age,
        )
    return "pass", f"{sensor} is RUNNING; last tick {age:.0f} s ago", age
