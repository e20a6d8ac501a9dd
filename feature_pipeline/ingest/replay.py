"""Replay a range of a stream into the store: the way back from a lost or damaged DuckDB file.

An ephemeral ordered consumer (no acks, gone when the connection closes) reads the range, so the
durable consumers and their ack state are untouched. Each chunk goes through the same validation,
staging and idempotent `apply_batch` as live batches: what is already stored is absorbed, what is
missing comes back exactly as it was (received_at is the stream's own timestamp).
Poison messages are counted, not dead-lettered again: the live pipeline did that when it first saw them
(replay DEADLETTER to restore the dead_letters table).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy

from feature_pipeline import shards, streams
from feature_pipeline.broker.auth import NatsAuth
from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.deliveries import Delivery, parse_reply
from feature_pipeline.ingest.staging import FolderStaging
from feature_pipeline.store.feature_store import FeatureStore

IDLE_SECONDS = 5.0  # no message for this long before the range end: the rest is gone (retention)


class ReplayError(ValueError):
    """The requested range cannot be replayed; the text says why."""


@dataclass(frozen=True)
class ReplayRange:
    stream: str
    start_seq: int | None = None
    start_time: datetime | None = None
    end_seq: int | None = None
    end_time: datetime | None = None

    def check(self, sources: tuple[streams.StreamSpec, ...]) -> None:
        known = streams.by_name(sources)  # DEADLETTER restores the dead_letters table
        if self.stream not in known:
            raise ReplayError(f"stream must be one of {', '.join(known)}, got {self.stream!r}")
        if self.start_seq is not None and self.start_time is not None:
            raise ReplayError("give start_seq or start_time, not both")
        if self.start_seq is not None and self.start_seq < 1:
            raise ReplayError(f"start_seq must be 1 or more, got {self.start_seq}")
        for name in ("start_time", "end_time"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ReplayError(f"{name} needs a time zone, like 2026-11-27T00:00:00Z")
        if self.start_seq and self.end_seq and self.end_seq < self.start_seq:
            raise ReplayError(f"end_seq {self.end_seq} is before start_seq {self.start_seq}")
        if self.start_time and self.end_time and self.end_time < self.start_time:
            raise ReplayError(f"end_time {self.end_time} is before start_time {self.start_time}")


@dataclass
class ReplayReport:
    read: int = 0
    stored: int = 0  # new rows: events that were missing from the store
    already_stored: int = 0
    poison: int = 0
    batches: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    stopped: str = ""
    poison_examples: list[str] = field(default_factory=list)


async def read_range(
    broker: Broker, rng: ReplayRange, chunk: int, report: ReplayReport
) -> AsyncIterator[list[Delivery]]:
    """Yield the range's messages in stream order, `chunk` at a time."""
    last = int((await broker.stream_state(rng.stream)).get("last_seq", 0))
    end_seq = min(rng.end_seq, last) if rng.end_seq else last
    if last == 0 or (rng.start_seq or 1) > end_seq:
        report.stopped = f"nothing to read: {rng.stream} holds sequences up to {last}"
        return
    sub = await broker.js.subscribe(
        ">",  # every subject the stream holds
        stream=rng.stream,
        ordered_consumer=True,
        config=_start(rng),
        pending_msgs_limit=chunk * 4,
    )
    out: list[Delivery] = []
    try:
        while (d := await _next(sub, rng, end_seq, report)) is not None:
            out.append(d)
            if len(out) >= chunk:
                yield out
                out = []
            if report.stopped:
                break
        if out:
            yield out
    finally:
        await sub.unsubscribe()


def _start(rng: ReplayRange) -> ConsumerConfig:
    if rng.start_time is not None:
        return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=rng.start_time)
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=rng.start_seq or 1)


async def _next(sub: Any, rng: ReplayRange, end_seq: int, report: ReplayReport) -> Delivery | None:
    """The next message of the range, or None past its end; `report.stopped` says why reading ends."""
    try:
        msg = await sub.next_msg(timeout=IDLE_SECONDS)
    except NatsTimeout:
        report.stopped = f"no message for {IDLE_SECONDS:.0f} s before sequence {end_seq}: stopped"
        return None
    _, _, seq, stored_ns = parse_reply(msg.reply)
    if rng.end_time is not None and stored_ns > rng.end_time.timestamp() * 1e9:
        report.stopped = f"reached end_time {rng.end_time.isoformat()}"
        return None
    if seq >= end_seq or msg.metadata.num_pending == 0:
        report.stopped = f"reached sequence {seq} (end {end_seq})"  # this one is the range's last
    headers = dict(msg.headers or {}) or None
    return Delivery(rng.stream, msg.subject, msg.reply, msg.data, headers, seq, 1, stored_ns)


@dataclass
class _Replay:
    stores: dict[int, FeatureStore]  # by shard: the shards this replay restores
    staging: FolderStaging  # a temp folder of this run's own
    rng: ReplayRange
    run_id: str
    log: Callable[[str], None]
    report: ReplayReport = field(default_factory=ReplayReport)

    async def run(self, broker: Broker, chunk: int) -> ReplayReport:
        async for deliveries in read_range(broker, self.rng, chunk, self.report):
            self._count(deliveries)
            n = next(iter(self.stores.values())).shards
            parts: dict[int, list[Delivery]] = {}
            for d, shard in zip(deliveries, shards.split([d.data for d in deliveries], n), strict=True):
                parts.setdefault(shard, []).append(d)
            for shard, part in sorted(parts.items()):
                if shard in self.stores:  # another shard's messages are its own replay's
                    await self._store(self.stores[shard], part)
        return self.report

    def _count(self, deliveries: list[Delivery]) -> None:
        report = self.report
        report.read += len(deliveries)
        report.first_seq = report.first_seq or deliveries[0].stream_seq
        report.last_seq = deliveries[-1].stream_seq

    async def _store(self, store: FeatureStore, deliveries: list[Delivery]) -> None:
        """Validate, stage and apply one chunk of one shard, exactly as a live batch (poison is counted, not
        re-dead-lettered)."""
        report = self.report
        batch_id = f"replay-{self.run_id}-{report.batches:05d}"
        self.staging.stage(deliveries, batch_id)
        # Blocking DuckDB work: off the event loop so the ordered consumer's heartbeats are answered.
        result = await asyncio.to_thread(store.apply_batch, self.staging.path(batch_id), batch_id)
        self.staging.remove(batch_id)
        report.poison += len(result.poison)
        for d, reason in result.poison[: max(0, 5 - len(report.poison_examples))]:
            report.poison_examples.append(f"{d.stream} #{d.stream_seq}: {reason}")
        report.batches += 1
        new = result.inserted
        report.stored += new
        report.already_stored += result.events_in_batch - new
        of = shards.describe(store.shard, store.shards)
        self.log(
            f"replayed {self.rng.stream} #{deliveries[0].stream_seq}-{deliveries[-1].stream_seq}"
            f"{f' into {of}' if of else ''}: {result.events_in_batch} events, {new} were missing, "
            f"{len(result.poison)} poison"
        )


def replay(
    url: str,
    auth: NatsAuth | None,
    stores: FeatureStore | list[FeatureStore],
    rng: ReplayRange,
    *,
    chunk: int = 50_000,
    work_root: Path | None = None,
    run_id: str = "manual",
    log: Callable[[str], None] = print,
) -> ReplayReport:
    """Re-read `rng` from JetStream and store it idempotently, each message in its shard's store (of those
    given: with several shards, a replay restores the shards it is given and reads past the others').

    Replay repairs a damaged store, so it first forgets the ids whose rows are gone (event_index must not
    absorb them) and ends with a full recomputation (the all-time partials must not count twice what a
    restored row had counted before it was lost); both read the whole history, which a repair may."""
    by_shard = {s.shard: s for s in ([stores] if isinstance(stores, FeatureStore) else stores)}
    for store in by_shard.values():
        rng.check(store.registry.event_streams)
        forgotten = store.forget_missing_ids()
        if forgotten:
            log(f"{forgotten} stored ids of {store.name} had lost their rows; replay can store them again")
    if work_root is not None:
        work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="replay-", dir=work_root))

    async def go() -> ReplayReport:
        async with await Broker.connect(url, "feature-pipeline-replay", auth) as broker:
            return await _Replay(by_shard, FolderStaging(work), rng, run_id, log).run(broker, chunk)

    try:
        report = asyncio.run(go())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for store in by_shard.values():
        store.recompute_all(consistency_sample=1)
    return report
