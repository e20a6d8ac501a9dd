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

from feature_pipeline import streams
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
    staging: Staging
    report: TickReport
    deadline: float  # time.monotonic() past which no pull may end
    chunk: int  # messages per pull round: what the sensor holds in memory at once
    read: tuple[streams.StreamSpec, ...]  # every stream the pipeline reads: its sources and DEADLETTER
    on_pull: OnPull | None = None  # called with each pull before it is staged (tests: slow pulls, a full disk)

    async def stage_batch(self, in_flight: int) -> None:
        """Stage one new batch when there is room in flight. One per tick: runs store batches one at a time
        (the `duckdb` pool), so a second batch would only wait, and its users' refresh and online write,
        which cost per user whatever the batch's size, would be paid twice; what is left joins the next."""
        if in_flight >= self.settings.max_batches_in_flight or time.monotonic() >= self.deadline:
            return
        max_bytes = self._room()
        if max_bytes is None:
            return
        manifest = await self._stage_one(max_bytes)
        if manifest is not None:
            self.report.staged.append(manifest)

    def _room(self) -> int | None:
        """The payload bytes the next batch may hold: never fetch what cannot be staged (it would only
        spend the messages' deliveries). None, with the reason in the report, when there is no room."""
        hold = staging_hold(self.staging)
        if hold:
            self.report.problem = f"not fetching: {hold}"
            return None
        try:
            room, _free = self.staging.payload_room()
        except OSError as exc:  # the folder went away between the two looks
            self.report.problem = f"not fetching: {self.staging.where} is not writable ({exc})"
            return None
        return min(room, self.settings.batch_max_bytes)

    async def _stage_one(self, max_bytes: int) -> Manifest | None:
        """One batch, pull by pull: its manifest, or None if nothing came."""
        writer = self.staging.writer()
        pulled: list[str] = []
        try:
            await self._fill(writer, max_bytes, pulled)
            if writer.size == 0:
                writer.abort()
                return None
            return writer.close()
        except OSError as exc:  # the disk filled up (or went away) under the batch
            writer.abort()
            await self._release(pulled, exc)
            return None
        except BaseException:
            writer.abort()
            raise

    async def _release(self, pulled: list[str], exc: OSError) -> None:
        """NAK what this batch had pulled, at once, rather than let it wait out ack_wait unacked."""
        released = await self.broker.nak([(reply, 0.0) for reply in pulled])
        self.report.nacked += released
        self.report.problem = (
            f"not fetching: staging a batch in {self.staging.where} failed ({exc}); its {released} pulled "
            "messages were released to NATS at once (NAK)"
        )

    async def _fill(self, writer: BatchWriter, max_bytes: int, pulled: list[str]) -> None:
        """Pull into `writer` until it is full, the consumers are drained, or the next pull would end past the
        tick's deadline."""
        limit = self.settings.batch_max_messages
        pull_seconds = 0.0
        while writer.size < limit:
            started = time.monotonic()
            room = max_bytes - writer.bytes
            if started + pull_seconds >= self.deadline or room <= 0:
                return
            want = min(self.chunk, limit - writer.size)
            try:
                deliveries = await self.pull_round(want, room)
            except MessageTooLarge:
                if writer.size == 0:
                    raise
                return  # full by bytes
            pulled.extend(d.reply for d in deliveries)
            self._add(writer, deliveries)
            if len(deliveries) < want:  # drained (or full by bytes: then the next tick goes on)
                return
            pull_seconds = time.monotonic() - started

    def _add(self, writer: BatchWriter, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            self.report.count_fetched(d.stream)
        if self.on_pull is not None:
            self.on_pull(deliveries)
        writer.add(deliveries)

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
