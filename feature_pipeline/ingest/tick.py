"""One tick of the batch lifecycle: settle finished batches, keep waiting ones alive, fetch and stage new ones.

Plain Python, no orchestrator: the run behind each batch is found through a `RunLookup`, and the
tick returns a `TickReport` saying which batches need a run. The staging folder, not any memory,
is the state: a batch stays there until every message in it has been acked, NAKed or
dead-lettered, so a crash anywhere (code server, daemon, NATS) leaves work to pick up on the next
tick, never work lost. A message is acked only once the run that stored its batch has succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nats.errors import Error as NatsError

from feature_pipeline import faults, streams
from feature_pipeline.broker import topology
from feature_pipeline.broker.auth import redact
from feature_pipeline.broker.client import Broker, BrokerUnavailable, TopologyError, nats_problem
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.broker.stats import collect
from feature_pipeline.ingest import bisect, layout
from feature_pipeline.ingest.failures import Cause, RunFailure
from feature_pipeline.ingest.fetch import Fetcher, OnPull
from feature_pipeline.ingest.report import TickReport
from feature_pipeline.ingest.runs import BatchRun, RunLookup
from feature_pipeline.ingest.settle import (
    Kind,
    RunOutcome,
    decide,
    keep_alive_due,
    nak_delay,
    outcome_of,
    waiting_to_start,
)
from feature_pipeline.ingest.shared_staging import open_staging
from feature_pipeline.ingest.staging import Manifest, Staging, delivery_from_row
from feature_pipeline.settings import Settings
from feature_pipeline.store.loader import sources_for

FETCH_CHUNK = 20_000  # messages per pull round: what the sensor holds in memory at once
SETTLE_CHUNK = 50_000  # rows per chunk when acking, keeping alive or NAKing a staged batch


@dataclass(frozen=True)
class TickOptions:
    """How a tick does its work, as opposed to what (Settings); tests and benchmarks set these."""

    fetch_chunk: int = FETCH_CHUNK
    settle_chunk: int = SETTLE_CHUNK
    fast_path: bool | None = None  # nats-py fast path: None = whenever its self-check passes
    on_pull: OnPull | None = None  # called with each pull before it is staged (tests)
    client_name: str = "feature-pipeline-sensor"


def run_tick(settings: Settings, runs: RunLookup, options: TickOptions | None = None) -> TickReport:
    """One tick. NATS trouble never raises: it ends the tick early with `report.problem` saying why."""
    options = options or TickOptions()
    started = time.monotonic()
    # Settling counts against the fetch time too: the tick should end inside the daemon's 5 s loop.
    deadline = started + settings.fetch_seconds
    report = TickReport()
    with open_every_staging(settings) as stagings:
        try:
            shards = [_Shard.look(k, staging, runs) for k, staging in stagings.items()]
            report.in_flight = sum(len(s.batches) for s in shards)
            report.lap("runs", started)
            # Staged batches without a run get it requested (again: the batch id is the run key, so the
            # orchestrator never starts two); so do the batches this tick stages. Parked ones wait for their shard.
            for shard in shards:
                for m in shard.batches:
                    if shard.found[m.batch_id] is None and not m.parked:
                        report.request(m.batch_id, shard.index)
            sources = sources_for(settings.features_file)
            tick = _Tick(settings, sources, shards, runs, options, report, deadline)
            asyncio.run(tick.exchange())
        except (BrokerUnavailable, NatsError, TimeoutError, ConnectionError, TopologyError, OSError) as exc:
            report.problem = _problem(exc, settings)
        for m in report.staged:
            if not m.parked:
                report.request(m.batch_id, report.shard_of[m.batch_id])
    return report


@contextlib.contextmanager
def open_every_staging(settings: Settings) -> Iterator[dict[int, Staging]]:
    """Every shard's staging, by shard, closed when done."""
    with contextlib.ExitStack() as stack:
        yield {k: stack.enter_context(open_staging(settings, k)) for k in range(settings.shards)}


def blocked_batches(settings: Settings, runs: RunLookup) -> list[str]:
    """Staged batches whose last run failed outside their messages, each with why (for health and checks)."""
    out = []
    with open_every_staging(settings) as stagings:
        for shard, staging in stagings.items():
            for manifest in staging.batches():
                run = runs.run_for(manifest.batch_id)
                if run is None or outcome_of(run.status) is not RunOutcome.FAILED:
                    continue
                failure = runs.failure(run)
                if failure.cause is Cause.INFRASTRUCTURE:
                    out.append(f"batch {manifest.batch_id}{_of(shard, settings.shards)}: {failure.text}")
    return out


def _of(shard: int, n: int) -> str:
    return f" of shard {shard}" if n > 1 else ""


def _problem(exc: Exception, settings: Settings) -> str:
    """What ended a tick early, in a line for the tick log and the checks."""
    if isinstance(exc, BrokerUnavailable | NatsError | TimeoutError | ConnectionError):
        return nats_problem(exc, settings.nats_url)
    return f"{type(exc).__name__}: {exc} (NATS {redact(settings.nats_url)})"


@dataclass
class _Shard:
    """One shard's staged batches in this tick, and whether it can take a new batch."""

    index: int
    staging: Staging
    batches: list[Manifest]  # in flight: staged at the tick's start, then those not settled
    found: dict[str, BatchRun | None]
    retrying: bool = False  # a batch of it waits for a retry (or its retry runs): nothing new is requested
    waiting: str | None = None  # a batch of it waits for its run to start

    @classmethod
    def look(cls, index: int, staging: Staging, runs: RunLookup) -> _Shard:
        batches = staging.batches()
        return cls(index, staging, batches, {m.batch_id: runs.run_for(m.batch_id) for m in batches})

    @property
    def busy(self) -> bool:
        return self.retrying or self.waiting is not None

    def in_flight(self, batch_max_messages: int) -> int:
        """Its batches, parked ones counted as the batches they will be merged into."""
        parked = sum(m.size for m in self.batches if m.parked)
        return sum(1 for m in self.batches if not m.parked) + -(-parked // batch_max_messages)


@dataclass
class _Tick:
    settings: Settings
    sources: tuple[streams.StreamSpec, ...]  # the registry's
    shards: list[_Shard]
    runs: RunLookup
    options: TickOptions
    report: TickReport
    deadline: float

    async def exchange(self) -> None:
        s, o = self.settings, self.options
        t = time.monotonic()
        async with await Broker.connect(s.nats_url, o.client_name, s.nats_auth, fast=o.fast_path) as broker:
            await broker.until_lost(self._work(broker, t))

    async def _work(self, broker: Broker, t: float) -> None:
        await self._ensure_topology(broker)
        refused = await layout.check(broker, self.settings)
        if refused:  # a changed number of shards: nothing is fetched, run or settled until it is put right
            self.report.problem = f"not ingesting: {refused}"
            self.report.to_request.clear()
            for shard in self.shards:  # what is in flight stays in flight, kept alive
                for m in shard.batches:
                    await self._keep_alive(broker, shard.staging, m)
            return
        t = self.report.lap("connect", t)
        for shard in self.shards:
            shard.batches = [m for m in shard.batches if not await self._settle_or_keep(broker, shard, m)]
        self.report.in_flight = sum(len(s.batches) for s in self.shards)
        t = self.report.lap("settle", t)
        self._unpark()
        await self._fetch(broker)
        t = self.report.lap("fetch", t)
        # After fetching: the server announces a message it gives up on only when it is next asked for messages.
        await self._rescue_exhausted(broker)
        in_flight = [m.counts for shard in self.shards for m in shard.batches] + [m.counts for m in self.report.staged]
        self.report.stats = await collect(broker, self.settings.durable_prefix, self.sources, in_flight)
        self.report.lap("observe", t)

    async def _ensure_topology(self, broker: Broker) -> None:
        s = self.settings
        await topology.ensure_streams(broker, self.sources, s.nats_replicas)
        await topology.ensure_consumers(
            broker,
            s.durable_prefix,
            self.sources,
            max_deliver=s.max_deliver,
            ack_wait_seconds=s.ack_wait_seconds,
            max_ack_pending=s.max_ack_pending,
        )

    def _unpark(self) -> None:
        """A shard that is free again gets its parked batches merged into one (or a few, if they hold more than
        a batch), whose run is requested now: a busy shard catches up in one run, not one per tick it missed."""
        s = self.settings
        for shard in self.shards:
            for m in shard.batches:
                if shard.waiting is None and waiting_to_start(_status(shard.found.get(m.batch_id))) and not m.parked:
                    shard.waiting = m.batch_id
            parked = [m for m in shard.batches if m.parked]
            if shard.busy or not parked:
                continue
            merged = shard.staging.merge(parked, s.batch_max_messages, s.batch_max_bytes, self.options.settle_chunk)
            shard.batches = [m for m in shard.batches if not m.parked]
            for m in merged:
                self.report.stage(m, shard.index)
            shard.waiting = merged[0].batch_id
            self.report.merged.append(
                f"merged {len(parked)} parked batch(es) of shard {shard.index} into {len(merged)} "
                f"({sum(m.size for m in merged)} messages)"
            )

    async def _fetch(self, broker: Broker) -> None:
        """A new batch per shard, when every shard has room for one and one of them is free. A free shard's batch
        gets its run now; a busy shard's part (a batch of it waits to start, or for a retry) is parked. With
        one shard that means: no new batch while one waits, its messages join the next, larger batch."""
        s, o = self.settings, self.options
        if any(shard.in_flight(s.batch_max_messages) >= s.max_batches_in_flight for shard in self.shards):
            self.report.held = True
            return
        if all(shard.busy for shard in self.shards):
            self.report.held = True
            waiting = [shard.waiting for shard in self.shards if shard.waiting and not shard.retrying]
            if waiting and not self.report.retrying:
                self.report.holding = waiting[0]
            return
        if time.monotonic() >= self.deadline:
            return
        read = streams.with_dead_letters(self.sources)
        stagings = {shard.index: shard.staging for shard in self.shards}
        busy = frozenset(shard.index for shard in self.shards if shard.busy)
        fetcher = Fetcher(broker, s, stagings, self.report, self.deadline, o.fetch_chunk, read, o.on_pull, busy)
        await fetcher.stage_batch()
        self.report.in_flight = sum(len(shard.batches) for shard in self.shards) + len(self.report.staged)

    # -- settling -------------------------------------------------------------------------------

    async def _settle_or_keep(self, broker: Broker, shard: _Shard, manifest: Manifest) -> bool:
        """Settle the batch if its run has ended (True), else keep its messages alive (False).

        A run that failed outside its messages settles nothing: the batch is retried instead, and its shard
        gets no new batch until it has succeeded."""
        run = shard.found.get(manifest.batch_id)
        outcome = outcome_of(_status(run))
        failure = self.runs.failure(run) if run is not None and outcome is RunOutcome.FAILED else None
        if outcome is RunOutcome.PENDING or (failure and failure.cause is Cause.INFRASTRUCTURE):
            await self._keep_alive(broker, shard.staging, manifest)
            where = f"batch {manifest.batch_id}{_of(shard.index, self.settings.shards)}"
            if run is not None and failure is not None:
                shard.retrying = True
                self._retry_later(shard.index, manifest.batch_id, run, failure, where)
            elif run is not None and run.attempt:  # a retry under way: no new batch until it has succeeded
                shard.retrying = True
                self.report.retrying.append(f"{where}: retry {run.attempt} is {run.status}")
            return False
        if failure and manifest.size > 1:
            await self._bisect(broker, shard, manifest, failure)
            return True
        await self._settle(broker, shard.staging, manifest, outcome, failure.text if failure else "")
        return True

    async def _bisect(self, broker: Broker, shard: _Shard, manifest: Manifest, failure: RunFailure) -> None:
        """Stage the batch again as two halves with a run each, instead of spending every message's delivery."""
        now, staging = time.time(), shard.staging
        for rows in staging.iter_deliveries(manifest.batch_id, ["reply"], chunk=self.options.settle_chunk):
            self.report.kept_alive += await broker.keep_alive(row["reply"] for row in rows)  # the halves' clock
        halves = bisect.split(staging, manifest, self.options.fetch_chunk)
        for half in halves:
            staging.mark_kept_alive(half.batch_id, now)
            self.report.stage(half, shard.index)
        names = " and ".join(h.batch_id for h in halves)
        split = f"split batch {manifest.batch_id} ({manifest.size} messages) into {names}"
        self.report.bisected.append(f"{split} after {failure.text}")

    def _retry_later(self, shard: int, batch_id: str, run: BatchRun, failure: RunFailure, where: str) -> None:
        """Request the batch's next run once its backoff has passed (doubling from NAK_DELAY, at most 5 min)."""
        attempt = run.attempt + 1
        due = (run.ended_at or 0.0) + nak_delay(attempt, self.settings.nak_delay_seconds)
        if time.time() >= due:
            self.report.request(batch_id, shard)
            self.report.attempts[batch_id] = attempt
            when = "now"
        else:
            when = f"in {due - time.time():.0f} s"
        self.report.retrying.append(f"{where}: {failure.text}; retry {attempt} {when}")

    async def _keep_alive(self, broker: Broker, staging: Staging, manifest: Manifest) -> None:
        if faults.NO_KEEPALIVE in self.settings.fault_set:
            return
        now = time.time()
        if not keep_alive_due(staging.kept_alive_at(manifest), now, self.settings.ack_wait_seconds):
            return
        for rows in staging.iter_deliveries(manifest.batch_id, ["reply"], chunk=self.options.settle_chunk):
            self.report.kept_alive += await broker.keep_alive(row["reply"] for row in rows)
        staging.mark_kept_alive(manifest.batch_id, now)

    async def _settle(
        self, broker: Broker, staging: Staging, manifest: Manifest, outcome: RunOutcome, failure: str
    ) -> None:
        """Ack a succeeded batch; NAK (growing delay) or dead-letter a failed one; then drop its files.

        Read in chunks: a batch can hold hundreds of thousands of messages, and their bodies are
        needed only for the few that are dead-lettered.
        """
        chunk = self.options.settle_chunk
        if outcome is RunOutcome.SUCCEEDED:
            for rows in staging.iter_deliveries(manifest.batch_id, ["reply"], chunk=chunk):
                self.report.acked += await broker.ack(row["reply"] for row in rows)
        else:
            for rows in staging.iter_deliveries(manifest.batch_id, chunk=chunk):
                await self._retry_or_give_up(broker, rows, outcome, failure)
        staging.remove(manifest.batch_id)
        self.report.settled_batches += 1

    async def _retry_or_give_up(
        self, broker: Broker, rows: list[dict[str, Any]], outcome: RunOutcome, failure: str
    ) -> None:
        naks: list[tuple[str, float]] = []
        dead: list[tuple[Delivery, str]] = []
        for row in rows:
            action = decide(
                outcome,
                num_delivered=row["num_delivered"],
                max_deliver=self.settings.max_deliver,
                nak_base_seconds=self.settings.nak_delay_seconds,
                failure=failure,
                may_dead_letter=row["stream"] != streams.DEADLETTER.name,
            )
            if action is None:
                continue  # only for a pending outcome, which is never settled
            if action.kind is Kind.DEAD_LETTER:
                dead.append((delivery_from_row(row), action.reason))
            else:
                naks.append((row["reply"], action.delay_seconds))
        self.report.dead_lettered += await broker.dead_letter(dead, self.settings.durable_prefix)
        self.report.nacked += await broker.nak(naks)

    # -- what the server gave up on -------------------------------------------------------------

    async def _rescue_exhausted(self, broker: Broker) -> None:
        """Copy to DEADLETTER what the server stopped delivering on its own (see topology.ensure_advisory_capture)."""
        found = await topology.exhausted(
            broker, self.settings.durable_prefix, self.sources, self.settings.nats_replicas
        )
        reason = (
            "the server gave up after {n} deliveries that were never acked (NATS_MAX_DELIVER="
            f"{self.settings.max_deliver}); the pipeline was not able to settle them"
        )
        rescue = [(e.original, reason.format(n=e.original.num_delivered)) for e in found if e.original is not None]
        self.report.dead_lettered += await broker.dead_letter(rescue, self.settings.durable_prefix)
        for e in found:
            if e.original is None:
                self.report.problem = (
                    f"{e.advisory.get('stream')} #{e.advisory.get('stream_seq')} ran out of deliveries and is no "
                    "longer in the stream (removed by its retention), so it could not be copied to DEADLETTER"
                )
        if found:
            await broker.ack(e.reply for e in found)


def _status(run: BatchRun | None) -> str | None:
    return run.status if run else None
