"""Per-stream figures read from JetStream: lag, last message, oldest unacked message, dead letters.

Lag is `num_pending + num_ack_pending` of the durable consumer, not a sequence difference,
which is wrong when the stream holds other subjects or after max-deliver drops.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from nats.js.errors import NotFoundError

from feature_pipeline import streams
from feature_pipeline.broker.auth import NatsAuth
from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.deliveries import ts_from_nats
from feature_pipeline.health import StreamStats

InFlight = Sequence[Mapping[str, int]]  # messages per stream name, one mapping per staged batch
Sources = Sequence[streams.StreamSpec]  # the registry's sources (the dead-letter stream is added here)


async def read_stream_stats(
    url: str, auth: NatsAuth, prefix: str, sources: Sources, in_flight: InFlight, client: str
) -> list[StreamStats]:
    """Connect, collect, close: for callers that have no connection of their own."""
    async with await Broker.connect(url, client, auth) as broker:
        return await collect(broker, prefix, sources, in_flight)


async def collect(broker: Broker, prefix: str, sources: Sources, in_flight: InFlight) -> list[StreamStats]:
    dead = await _dead_letters_by_stream(broker, sources)
    every = streams.with_dead_letters(tuple(sources))
    return [await _one(broker, prefix, spec, in_flight, dead.get(spec.name, 0)) for spec in every]


async def _dead_letters_by_stream(broker: Broker, sources: Sources) -> dict[str, int]:
    out = {}
    for spec in sources:
        out[spec.name] = 0
        for prefix in spec.prefixes:
            counts = await broker.subject_counts(streams.DEADLETTER.name, streams.dead_letter_subject(f"{prefix}.>"))
            out[spec.name] += sum(counts.values())
    return out


async def _one(broker: Broker, prefix: str, spec: streams.StreamSpec, in_flight: InFlight, dead: int) -> StreamStats:
    name = streams.consumer_name(prefix, spec)
    info = await broker.consumer_info(spec.name, name)
    state = await broker.stream_state(spec.name)
    batches = [counts[spec.name] for counts in in_flight if counts.get(spec.name)]
    lag = (info.num_pending or 0) + (info.num_ack_pending or 0)
    return StreamStats(
        stream=spec.name,
        consumer=name,
        consumer_lag=lag,
        num_pending=info.num_pending or 0,
        num_ack_pending=info.num_ack_pending or 0,
        num_redelivered=info.num_redelivered or 0,
        stream_messages=int(state.get("messages", 0)),
        last_message_at=ts_from_nats(state.get("last_ts")),
        in_flight_batches=len(batches),
        in_flight_messages=sum(batches),
        dead_letters=dead,
        oldest_unacked_age_seconds=await _oldest_unacked_age(broker, spec, info) if lag else 0.0,
    )


async def _oldest_unacked_age(broker: Broker, spec: streams.StreamSpec, info: Any) -> float:
    """Age of the first message after the consumer's ack floor (the oldest one not yet acked)."""
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    try:
        only = spec.subjects[0] if len(spec.subjects) == 1 else ">"  # the stream holds only its subjects
        msg = await broker.js.get_msg(spec.name, seq=floor + 1, subject=only, next=True)
    except NotFoundError:
        return 0.0
    stored = msg.time if isinstance(msg.time, datetime) else ts_from_nats(str(msg.time))
    return max(0.0, time.time() - stored.timestamp()) if stored else 0.0
