"""One tick of the batch lifecycle: settle finished batches, keep waiting ones alive, fetch and stage new ones.

Plain Python, no orchestrator: the run behind each batch is found through a `RunLookup`, and the
tick returns a `TickReport` saying which batches need a run. The staging folder, not any memory,
is the state: a batch stays there until every message in it has been acked, NAKed or
dead-lettered, so a crash anywhere (code server, daemon, NATS) leaves work to pick up on the next
tick, never work lost. A message is acked only once the run that stored its batch has succeeded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from nats.errors import Error as NatsError

from feature_pipeline import faults, streams
from feature_pipeline.broker import topology
from feature_pipeline.broker.auth import redact
from feature_pipeline.broker.client import Broker, BrokerUnavailable, TopologyError, nats_problem
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.broker.stats import collect
from feature_pipeline.ingest import bisect
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
from feature_pipeline.ingest.staging import Manifest, Staging
from feature_pipeline.settings import Settings
from feature_pipeline.store.intake import delivery_from_row
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
    with open_staging(settings) as staging:
        try:
            batches = staging.batches()
            found = {m.batch_id: runs.run_for(m.batch_id) for m in batches}
            report.in_flight = len(batches)
            report.lap("runs", started)
            # Staged batches without a run get it requested (again: the batch id is the run key, so the
            # orchestrator never starts two); so do the batches this tick stages.
            report.to_request = [m.batch_id for m in batches if found[m.batch_id] is None]
            sources = sources_for(settings.features_file)
            tick = _Tick(settings, sources, staging, runs, options, report, deadline)
            asyncio.run(tick.exchange(batches, found))
        except (BrokerUnavailable, NatsError, TimeoutError, ConnectionError, TopologyError, OSError) as exc:
            report.problem = _problem(exc, settings)
        report.to_request += [m.batch_id for m in report.staged]
    return report


def blocked_batches(settings: Settings, runs: RunLookup) -> list[str]:
    """Staged batches whose last run failed outside their messages, each with why (for health and checks)."""
    out = []
    with open_staging(settings) as staging:
        for manifest in staging.batches():
            run = runs.run_for(manifest.batch_id)
            if run is None or outcome_of(run.status) is not RunOutcome.FAILED:
                continue
            failure = runs.failure(run)
            if failure.cause is Cause.INFRASTRUCTURE:
                out.append(f"batch {manifest.batch_id}: {failure.text}")
    return out


def _problem(exc: Exception, settings: Settings) -> str:
    """What ended a tick early, in a line for the tick log and the checks."""
    if isinstance(exc, BrokerUnavailable | NatsError | TimeoutError | ConnectionError):
        return nats_problem(exc, settings.nats_url)
    return f"{type(exc).__name__}: {exc} (NATS {redact(settings.nats_url)})"


@dataclass
class _Tick:
    settings: Settings
    sources: tuple[streams.StreamSpec, ...]  # the registry's
    staging: Staging
    runs: RunLookup
    options: TickOptions
    report: TickReport
    deadline: float

    async def exchange(self, batches: list[Manifest], found: dict[str, BatchRun | None]) -> None:
        s, o = self.settings, self.options
        t = time.monotonic()
        async with await Broker.connect(s.nats_url, o.client_name, s.nats_auth, fast=o.fast_path) as broker:
            await broker.until_lost(self._work(broker, batches, found, t))

    async def _work(self, broker: Broker, batches: list[Manifest], found: dict[str, BatchRun | None], t: float) -> None:
        await self._ensure_topology(broker)
        t = self.report.lap("connect", t)
        remaining = [m for m in batches if not await self._settle_or_keep(broker, m, found[m.batch_id])]
        self.report.in_flight = len(remaining)
        t = self.report.lap("settle", t)
        await self._fetch(broker, remaining, found)
        t = self.report.lap("fetch", t)
        # After fetching: the server announces a message it gives up on only when it is next asked for messages.
        await self._rescue_exhausted(broker)
        in_flight = [m.counts for m in (*remaining, *self.report.staged)]
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

    async def _fetch(self, broker: Broker, remaining: list[Manifest], found: dict[str, BatchRun | None]) -> None:
        # One batch waiting for its run to start is enough: staging another behind it would only add a
        # run (seconds of start-up each); held back, the messages join the next batch instead.
        if self.report.retrying:
            return
        waiting = [m.batch_id for m in remaining if waiting_to_start(_status(found.get(m.batch_id)))]
        if waiting:
            self.report.holding = waiting[0]
            return
        o = self.options
        read = streams.with_dead_letters(self.sources)
        fetcher = Fetcher(
            broker, self.settings, self.staging, self.report, self.deadline, o.fetch_chunk, read, o.on_pull
        )
        await fetcher.stage_batch(len(remaining))
        self.report.in_flight = len(remaining) + len(self.report.staged)

    # -- settling -------------------------------------------------------------------------------

    async def _settle_or_keep(self, broker: Broker, manifest: Manifest, run: BatchRun | None) -> bool:
        """Settle the batch if its run has ended (True), else keep its messages alive (False).

        A run that failed outside its messages settles nothing: the batch is retried instead."""
        outcome = outcome_of(_status(run))
        failure = self.runs.failure(run) if run is not None and outcome is RunOutcome.FAILED else None
        if outcome is RunOutcome.PENDING or (failure and failure.cause is Cause.INFRASTRUCTURE):
            await self._keep_alive(broker, manifest)
            if run is not None and failure is not None:
                self._retry_later(manifest.batch_id, run, failure)
            elif run is not None and run.attempt:  # a retry under way: no new batch until it has succeeded
                self.report.retrying.append(f"batch {manifest.batch_id}: retry {run.attempt} is {run.status}")
            return False
        if failure and manifest.size > 1:
            await self._bisect(broker, manifest, failure)
            return True
        await self._settle(broker, manifest, outcome, failure.text if failure else "")
        return True

    async def _bisect(self, broker: Broker, manifest: Manifest, failure: RunFailure) -> None:
        """Stage the batch again as two halves with a run each, instead of spending every message's delivery."""
        now = time.time()
        for rows in self.staging.iter_deliveries(manifest.batch_id, ["reply"], chunk=self.options.settle_chunk):
            self.report.kept_alive += await broker.keep_alive(row["reply"] for row in rows)  # the halves' clock
        halves = bisect.split(self.staging, manifest, self.options.fetch_chunk)
        for half in halves:
            self.staging.mark_kept_alive(half.batch_id, now)
        self.report.staged += halves
        names = " and ".join(h.batch_id for h in halves)
        split = f"split batch {manifest.batch_id} ({manifest.size} messages) into {names}"
        self.report.bisected.append(f"{split} after {failure.text}")

    def _retry_later(self, batch_id: str, run: BatchRun, failure: RunFailure) -> None:
        """Request the batch's next run once its backoff has passed (doubling from NAK_DELAY, at most 5 min)."""
        attempt = run.attempt + 1
        due = (run.ended_at or 0.0) + nak_delay(attempt, self.settings.nak_delay_seconds)
        if time.time() >= due:
            self.report.to_request.append(batch_id)
            self.report.attempts[batch_id] = attempt
            when = "now"
        else:
            when = f"in {due - time.time():.0f} s"
        self.report.retrying.append(f"batch {batch_id}: {failure.text}; retry {attempt} {when}")

    async def _keep_alive(self, broker: Broker, manifest: Manifest) -> None:
        if faults.NO_KEEPALIVE in self.settings.fault_set:
            return
        now = time.time()
        if not keep_alive_due(self.staging.kept_alive_at(manifest), now, self.settings.ack_wait_seconds):
            return
        for rows in self.staging.iter_deliveries(manifest.batch_id, ["reply"], chunk=self.options.settle_chunk):
            self.report.kept_alive += await broker.keep_alive(row["reply"] for row in rows)
        self.staging.mark_kept_alive(manifest.batch_id, now)

    async def _settle(self, broker: Broker, manifest: Manifest, outcome: RunOutcome, failure: str) -> None:
        """Ack a succeeded batch; NAK (growing delay) or dead-letter a failed one; then drop its files.

        Read in chunks: a batch can hold hundreds of thousands of messages, and their bodies are
        needed only for the few that are dead-lettered.
        """
        chunk = self.options.settle_chunk
        if outcome is RunOutcome.SUCCEEDED:
            for rows in self.staging.iter_deliveries(manifest.batch_id, ["reply"], chunk=chunk):
                self.report.acked += await broker.ack(row["reply"] for row in rows)
        else:
            for rows in self.staging.iter_deliveries(manifest.batch_id, chunk=chunk):
                await self._retry_or_give_up(broker, rows, outcome, failure)
        self.staging.remove(manifest.batch_id)
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
