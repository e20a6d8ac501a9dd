"""Per-stream figures for the sensor's observations and `feature-pipeline health`.

Lag is `num_pending + num_ack_pending` of the durable consumer (not a sequence
difference, which is wrong when the stream holds other subjects or after
max-deliver drops).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime

from feature_pipeline.broker import DEADLETTER, STREAMS, Broker, consumer_name, ts_from_nats
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

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["last_message_at"] = self.last_message_at.isoformat() if self.last_message_at else None
        out["seconds_since_last_message"] = (
            round(time.time() - self.last_message_at.timestamp(), 3) if self.last_message_at else None
        )
        return out


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
        out.append(
            StreamStats(
                stream=spec.name,
                consumer=name,
                consumer_lag=(info.num_pending or 0) + (info.num_ack_pending or 0),
                num_pending=info.num_pending or 0,
                num_ack_pending=info.num_ack_pending or 0,
                num_redelivered=info.num_redelivered or 0,
                stream_messages=int(state.get("messages", 0)),
                last_message_at=ts_from_nats(state.get("last_ts")),
                in_flight_batches=len(batches),
                in_flight_messages=sum(m.counts.get(spec.name, 0) for m in batches),
                dead_letters=dead.get(spec.name, 0),
            )
        )
    return out
