"""Streams and durable consumers: created when missing, put back when changed, and the advisory capture.

Streams are created (file storage) if absent and otherwise left as their owner made them.
Consumers are created or updated in place with `add_consumer` (a bound `pull_subscribe` would
silently ignore changed settings), so a deleted consumer comes back and a changed one is put back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, ObjectStoreConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from feature_pipeline import streams
from feature_pipeline.broker.client import Broker, TopologyError
from feature_pipeline.broker.deliveries import Delivery, ts_from_nats

MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
ADVISORY_RETENTION_SECONDS = 7 * 24 * 3600


async def ensure_streams(broker: Broker, sources: Sequence[streams.StreamSpec], replicas: int = 1) -> None:
    """Create the streams that are missing; existing ones are left as their owner made them."""
    for spec in streams.with_dead_letters(tuple(sources)):
        try:
            await broker.js.stream_info(spec.name)
        except NotFoundError:
            config = StreamConfig(
                name=spec.name, subjects=list(spec.subjects), storage=StorageType.FILE, num_replicas=replicas
            )
            try:
                await broker.js.add_stream(config)
            except BadRequestError as exc:
                subjects = ", ".join(spec.subjects)
                raise TopologyError(f"cannot create stream {spec.name} for {subjects}: {exc.description}") from None
    await _ensure_dead_letter_bodies(broker, replicas)


async def _ensure_dead_letter_bodies(broker: Broker, replicas: int) -> None:
    """The object store for dead letters whose body does not fit the DEADLETTER copy (kept like the stream)."""
    try:
        await broker.js.object_store(streams.DEADLETTER_BODIES)
    except NotFoundError:
        config = ObjectStoreConfig(
            bucket=streams.DEADLETTER_BODIES,
            description="Whole bodies of dead letters too large for their copy on DEADLETTER",
            storage=StorageType.FILE,
            replicas=replicas,
        )
        await broker.js.create_object_store(streams.DEADLETTER_BODIES, config=config)


async def ensure_consumers(
    broker: Broker,
    prefix: str,
    sources: Sequence[streams.StreamSpec],
    *,
    max_deliver: int,
    ack_wait_seconds: int,
    max_ack_pending: int,
) -> None:
    """Create or update the durable pull consumers in place. A consumer of a source that was removed from the
    registry is left on the server, unread (its messages wait there until the source comes back)."""
    for spec in streams.with_dead_letters(tuple(sources)):
        config = ConsumerConfig(
            durable_name=streams.consumer_name(prefix, spec),
            ack_policy=AckPolicy.EXPLICIT,
            # The stream holds only these subjects; a filter is kept where there is one (what existing consumers
            # were made with: changing it is refused by older servers).
            filter_subject=spec.subjects[0] if len(spec.subjects) == 1 else None,
            # A dead letter is never dropped: it is retried until the dead_letters table has it.
            max_deliver=max_deliver if spec.carries_events else -1,
            ack_wait=float(ack_wait_seconds),
            max_ack_pending=max_ack_pending,
            max_waiting=64,
        )
        try:
            await broker.js.add_consumer(spec.name, config)
        except BadRequestError as exc:
            raise TopologyError(
                f"consumer {config.durable_name} on stream {spec.name} exists with settings that cannot be "
                f"changed in place ({exc.description}); delete it or pick another NATS_DURABLE_PREFIX"
            ) from None


async def ensure_advisory_capture(
    broker: Broker, prefix: str, sources: Sequence[streams.StreamSpec], replicas: int = 1
) -> str:
    """A stream and consumer that keep the server's MAX_DELIVERIES advisories for our consumers.

    The server drops a message from a consumer once it has been delivered max_deliver times
    without an ack, announcing it only by a core-NATS advisory. That happens without any failed
    run when deliveries expire unacked (a sensor that keeps crashing between fetch and stage).
    Captured, the sensor copies those messages to DEADLETTER instead of losing track of them.
    """
    name = streams.advisory_stream(prefix)
    subjects = [f"{MAX_DELIVERIES_ADVISORY}.{s.name}.{streams.consumer_name(prefix, s)}" for s in sources]
    try:
        info = await broker.js.stream_info(name)
        missing = [s for s in subjects if s not in (info.config.subjects or [])]
        if missing:  # a source was added: its consumer's advisories are kept too
            await broker.js.update_stream(info.config.evolve(subjects=[*(info.config.subjects or []), *missing]))
    except NotFoundError:
        await broker.js.add_stream(
            StreamConfig(
                name=name,
                subjects=subjects,
                storage=StorageType.FILE,
                max_age=ADVISORY_RETENTION_SECONDS,
                num_replicas=replicas,
            )
        )
    config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=60.0, max_ack_pending=10_000)
    await broker.js.add_consumer(name, config)
    return name


@dataclass(frozen=True)
class Exhausted:
    """A message the server gave up on, from its advisory."""

    original: Delivery | None  # None: the stream no longer has it (removed by retention)
    advisory: dict[str, Any]
    reply: str  # the advisory's own ack subject, to ack once handled


async def exhausted(
    broker: Broker, prefix: str, sources: Sequence[streams.StreamSpec], replicas: int = 1, limit: int = 1000
) -> list[Exhausted]:
    """Messages the server gave up on since the last call, with their originals where still stored."""
    name = await ensure_advisory_capture(broker, prefix, sources, replicas)
    out = []
    for adv in await broker.pull(name, name, batch=limit, max_bytes=8 * 1024 * 1024):
        info = json.loads(adv.data)
        out.append(Exhausted(await _original(broker, info), info, adv.reply))
    return out


async def _original(broker: Broker, info: dict[str, Any]) -> Delivery | None:
    try:
        raw = await broker.js.get_msg(info["stream"], seq=int(info["stream_seq"]))
    except NotFoundError:
        return None
    stored = raw.time if isinstance(raw.time, datetime) else ts_from_nats(str(raw.time))
    return Delivery(
        stream=info["stream"],
        subject=raw.subject or "",
        reply="",
        data=raw.data or b"",
        headers=dict(raw.headers) if raw.headers else None,
        stream_seq=int(info["stream_seq"]),
        num_delivered=int(info.get("deliveries", 0)),
        stored_ns=int(stored.timestamp() * 1e9) if stored else 0,
    )
