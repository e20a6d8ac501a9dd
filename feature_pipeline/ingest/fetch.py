"""Fetching new micro-batches: pulls across the consumers, staged pull by pull as they came.

A batch grows pull by pull (Parquet row groups, so the sensor holds one pull in memory) until it
is full by messages or bytes, the consumers are drained, or the next pull would end past the
tick's fetch deadline. Nothing is parsed here: the run checks the messages (`store.intake`) and
dead-letters its poison, so the sensor's thread only pulls and writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from feature_pipeline import shards, streams
from feature_pipeline.broker.client import Broker, MessageTooLarge
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.ingest.report import TickReport
from feature_pipeline.ingest.staging import STAGING_MARGIN_BYTES, BatchWriter, Manifest, Staging
from feature_pipeline.settings import MIB, Settings

OnPull = Callable[[Sequence[Delivery]], None]
MIN_BATCH_BYTES = 2 * MIB  # a batch must hold at least one message of the server's largest default size


@dataclass
class Fetcher:
    broker: Broker
    settings: Settings
    stagings: dict[int, Staging]  # every shard's
    report: TickReport
    deadline: float  # time.monotonic() past which no pull may end
    chunk: int  # messages per pull round: what the sensor holds in memory at once
    read: tuple[streams.StreamSpec, ...]  # every stream the pipeline reads: its sources and DEADLETTER
    on_pull: OnPull | None = None  # called with each pull before it is staged (tests: slow pulls, a full disk)
    parked: frozenset[int] = frozenset()  # busy shards: their part of the pull is staged parked (no run yet)

    async def stage_batch(self) -> None:
        """Stage one new batch per shard that gets messages. One per tick: a shard's runs store its batches one at
        a time, so a second batch would only wait, and its users' refresh and online write, which cost per user
        whatever the batch's size, would be paid twice; what is left joins the next."""
        max_bytes = self._room()
        if max_bytes is None:
            return
        for shard, manifest in await self._stage(max_bytes):
            self.report.stage(manifest, shard)

    def _room(self) -> int | None:
        """The payload bytes a shard's next batch may hold: never fetch what cannot be staged (it would only
        spend the messages' deliveries). None, with the reason in the report, when there is no room."""
        rooms = []
        for staging in self.stagings.values():
            hold = staging_hold(staging)
            if hold:
                self.report.problem = f"not fetching: {hold}"
                return None
            try:
                rooms.append(staging.payload_room()[0])
            except OSError as exc:  # the folder went away between the two looks
                self.report.problem = f"not fetching: {staging.where} is not writable ({exc})"
                return None
        # The shards' folders may share a disk: each batch gets an equal part of what is free.
        return min(min(rooms) // len(rooms), self.settings.batch_max_bytes)

    async def _stage(self, max_bytes: int) -> list[tuple[int, Manifest]]:
        """One batch per shard that got messages, pull by pull: their manifests (none if nothing came)."""
        writers: dict[int, BatchWriter] = {}
        pulled: dict[int, list[str]] = {k: [] for k in self.stagings}
        try:
            for shard, staging in self.stagings.items():
                writers[shard] = staging.writer(parked=shard in self.parked)
            await self._fill(writers, max_bytes, pulled)
        except OSError as exc:  # the disk filled up (or went away) under the batch
            _abort(writers)
            await self._release([r for replies in pulled.values() for r in replies], exc)
            return []
        except BaseException:
            _abort(writers)
            raise
        out: list[tuple[int, Manifest]] = []
        for shard in [k for k, w in writers.items() if w.size == 0]:
            writers.pop(shard).abort()
        for shard in sorted(writers):
            try:
                out.append((shard, writers.pop(shard).close()))
            except OSError as exc:  # this batch and those not closed yet go back; the closed ones are staged
                unstaged = [r for k in [shard, *writers] for r in pulled[k]]
                _abort(writers)
                await self._release(unstaged, exc)
                return out
        return out

    async def _release(self, pulled: list[str], exc: OSError) -> None:
        """NAK what this batch had pulled, at once, rather than let it wait out ack_wait unacked."""
        released = await self.broker.nak([(reply, 0.0) for reply in pulled])
        self.report.nacked += released
        self.report.problem = (
            f"not fetching: staging a batch in {self.staging_where} failed ({exc}); its {released} pulled "
            "messages were released to NATS at once (NAK)"
        )

    @property
    def staging_where(self) -> str:
        return self.stagings[min(self.stagings)].where

    async def _fill(self, writers: dict[int, BatchWriter], max_bytes: int, pulled: dict[int, list[str]]) -> None:
        """Pull into the shards' writers (one each) until one is full, the consumers are drained, or the next pull
        would end past the tick's deadline. A pull may all belong to one shard, so it asks only for what the
        fullest has room for."""
        limit = self.settings.batch_max_messages
        pull_seconds = 0.0
        while (fullest := max((w.size for w in writers.values()), default=0)) < limit:
            started = time.monotonic()
            room = max_bytes - max((w.bytes for w in writers.values()), default=0)
            if started + pull_seconds >= self.deadline or room <= 0:
                return
            want = min(self.chunk, limit - fullest)
            try:
                deliveries = await self.pull_round(want, room)
            except MessageTooLarge:
                if fullest == 0 and not any(w.size for w in writers.values()):
                    raise
                return  # full by bytes
            self._add(writers, deliveries, pulled)
            if len(deliveries) < want:  # drained (or full by bytes: then the next tick goes on)
                return
            pull_seconds = time.monotonic() - started

    def _add(self, writers: dict[int, BatchWriter], deliveries: list[Delivery], pulled: dict[int, list[str]]) -> None:
        for d in deliveries:
            self.report.count_fetched(d.stream)
        if self.on_pull is not None:
            self.on_pull(deliveries)
        by_shard: dict[int, list[Delivery]] = {}
        for d, shard in zip(deliveries, shards.split([d.data for d in deliveries], self.settings.shards), strict=True):
            by_shard.setdefault(shard, []).append(d)
        for shard, part in by_shard.items():
            pulled[shard].extend(d.reply for d in part)
            writers[shard].add(part)

    async def pull_round(self, want: int, max_bytes: int) -> list[Delivery]:
        """Up to `want` messages across the consumers: a fair share each first, then what is left."""
        out: list[Delivery] = []
        used = 0
        share = max(1, want // len(self.read))
        for fair in (True, False):
            for spec in self.read:
                ask = min(share, want - len(out)) if fair else want - len(out)
                if ask <= 0:
                    return out
                try:
                    got = await self._pull(spec, ask, max_bytes - used)
                except MessageTooLarge:
                    if used == 0:
                        raise
                    return out  # the batch is full by bytes
                out.extend(got)
                used += sum(d.size for d in got)
        return out

    async def _pull(self, spec: streams.StreamSpec, batch: int, max_bytes: int) -> list[Delivery]:
        consumer = streams.consumer_name(self.settings.durable_prefix, spec)
        return await self.broker.pull(spec.name, consumer, batch=batch, max_bytes=max_bytes)


def _abort(writers: dict[int, BatchWriter]) -> None:
    for writer in writers.values():
        writer.abort()
    writers.clear()


def staging_hold(staging: Staging) -> str | None:
    """Why the sensor holds off fetching into this staging now, or None when it would fetch. One rule for the
    sensor, `health` and the ingest_running check, so a stall the sensor sees is never reported as well."""
    try:
        staging.check_writable()
        room, free = staging.payload_room()
    except OSError as exc:
        return f"{staging.where} is not writable ({exc})"
    if room < MIN_BATCH_BYTES:
        return (
            f"{staging.where} has {free / MIB:.1f} MiB free; a batch needs at least "
            f"{(2 * MIN_BATCH_BYTES + STAGING_MARGIN_BYTES) / MIB:.0f} MiB there"
        )
    return None
