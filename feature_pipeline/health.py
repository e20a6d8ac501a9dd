"""Per-stream figures for the sensor's observations and `feature-pipeline health`.

Lag is `num_pending + num_ack_pending` of the durable consumer (not a sequence
difference, which is wrong when the stream holds other subjects or after
max-deliver drops).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from nats.js.errors import NotFoundError

from feature_pipeline.broker import DEADLETTER, STREAMS, Broker, NatsAuth, StreamSpec, consumer_name, ts_from_nats
from feature_pipeline.staging import Manifest


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


async def _oldest_unacked_age(broker: Broker, spec: StreamSpec, info: Any) -> float:
    """Age of the first message after the consumer's ack floor (the oldest one not yet acked)."""
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    try:
        msg = await broker.js.get_msg(spec.name, seq=floor + 1, subject=spec.subject, next=True)
    except NotFoundError:
        return 0.0
    stored = msg.time if isinstance(msg.time, datetime) else ts_from_nats(str(msg.time))
    return max(0.0, time.time() - stored.timestamp()) if stored else 0.0


async def read_stream_stats(
    url: str, auth: NatsAuth, prefix: str, in_flight: list[Manifest], client: str
) -> list[StreamStats]:
    """Connect, collect, close: for callers that have no connection of their own."""
    async with await Broker.connect(url, client, auth) as broker:
        return await collect(broker, prefix, in_flight)


async def collect(broker: Broker, prefix: str, in_flight: list[Manifest]) -> list[StreamStats]:
    dead = {}
    for spec in STREAMS:
        if spec is not DEADLETTER:
            counts = await broker.subject_counts(DEADLETTER.name, f"deadletter.{spec.key}.>")
            dead[spec.name] = sum(counts.values())
    out = []
    for spec in STREAMS:
        name = consumer_name(prefix, spec)
        info = await broker.consumer_info(spec.name, name)
        state = await broker.stream_state(spec.name)
        batches = [m for m in in_flight if m.counts.get(spec.name)]
        lag = (info.num_pending or 0) + (info.num_ack_pending or 0)
        out.append(
            StreamStats(
                stream=spec.name,
                consumer=name,
                consumer_lag=lag,
                num_pending=info.num_pending or 0,
                num_ack_pending=info.num_ack_pending or 0,
                num_redelivered=info.num_redelivered or 0,
                stream_messages=int(state.get("messages", 0)),
                last_message_at=ts_from_nats(state.get("last_ts")),
                in_flight_batches=len(batches),
                in_flight_messages=sum(m.counts.get(spec.name, 0) for m in batches),
                dead_letters=dead.get(spec.name, 0),
                oldest_unacked_age_seconds=await _oldest_unacked_age(broker, spec, info) if lag else 0.0,
            )
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
