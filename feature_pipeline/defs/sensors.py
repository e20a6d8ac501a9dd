"""The ingest sensor: settle finished batches, keep running ones alive, fetch and stage new ones.

The staging folder, not the sensor cursor, is the state: a batch stays there until every
message in it has been acked, NAKed or dead-lettered, so a crash anywhere (code server,
daemon, NATS) leaves work to pick up on the next tick, never work lost. Run outcomes are
read by polling run records tagged with the batch id rather than by a run_status_sensor,
whose cursor moves on even when its handler fails (shared/notes/dagster-facts.md).
"""

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime

import dagster as dg
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError

from feature_pipeline.broker import (
    DEADLETTER,
    STREAMS,
    Broker,
    BrokerUnavailable,
    Delivery,
    MessageTooLarge,
    TopologyError,
    consumer_name,
    redact,
)
from feature_pipeline.defs.assets import BATCH_TAG, ingest_job
from feature_pipeline.defs.checks import stream_events, unreachable_evaluations
from feature_pipeline.defs.resources import IngestResource, MonitoringResource, NatsResource
from feature_pipeline.health import StreamStats, collect, read_stream_stats
from feature_pipeline.settle import Kind, RunOutcome, decide, outcome_of
from feature_pipeline.staging import Manifest, Staging, assemble, delivery_from_row

SENSOR_NAME = "ingest_sensor"
# The default run launcher cannot see a killed run worker; run monitoring fails runs past this tag.
MAX_RUNTIME_TAG = "dagster/max_runtime"
# Messages per pull round: what the sensor holds in memory at once, however large the batch.
FETCH_CHUNK = 20_000
# Rows per chunk when acking, keeping alive or NAKing a staged batch.
SETTLE_CHUNK = 50_000
# batch id -> when this process last sent +WPI for it (time.time()); lost on restart, which only
# means one early keep-alive.
_kept_alive_at: dict[str, float] = {}


@dataclass
class TickReport:
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    poison: int = 0
    kept_alive: int = 0
    settled_batches: int = 0
    fetched: dict[str, int] = field(default_factory=dict)
    staged: list[Manifest] = field(default_factory=list)
    in_flight: int = 0
    problem: str | None = None
    stats: list[StreamStats] = field(default_factory=list)
    # Seconds spent per phase of the tick, in the log line: where a slow tick went.
    seconds: dict[str, float] = field(default_factory=dict)
    holding: str | None = None  # a batch still waiting for its run to start: no new batch this tick

    def lap(self, phase: str, since: float) -> float:
        now = time.monotonic()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - since, 2)
        return now

    def summary(self) -> str:
        parts = []
        if self.fetched:
            parts.append("fetched " + ", ".join(f"{n} from {s}" for s, n in self.fetched.items()))
        elif self.holding:
            parts.append(f"not fetching while batch {self.holding} waits for its run to start")
        elif not self.problem:
            parts.append("no new messages")
        if self.staged:
            parts.append(f"staged {len(self.staged)} batch(es) of {sum(m.size for m in self.staged)} messages")
        if self.poison:
            parts.append(f"dead-lettered {self.poison} poison message(s)")
        if self.settled_batches:
            parts.append(
                f"settled {self.settled_batches} batch(es): acked {self.acked}, NAKed {self.nacked}, "
                f"dead-lettered {self.dead_lettered}"
            )
        if self.kept_alive:
            parts.append(f"kept {self.kept_alive} in-flight messages alive")
        parts.append(f"{self.in_flight} batch(es) in flight")
        if self.seconds:
            parts.append("took " + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()))
        text = "; ".join(parts)
        return f"{self.problem}; {text}" if self.problem else text


def _run_for(instance: dg.DagsterInstance, batch_id: str) -> dg.DagsterRun | None:
    records = instance.get_run_records(filters=dg.RunsFilter(tags={BATCH_TAG: batch_id}), limit=1)
    return records[0].dagster_run if records else None


def _failure_text(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    if run.status == dg.DagsterRunStatus.CANCELED:
        return f"run {run.run_id} was canceled"
    conn = instance.get_records_for_run(
        run.run_id,
        of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE},
        ascending=True,
    )
    for record in conn.records:
        event = record.event_log_entry.dagster_event
        error = getattr(event.event_specific_data, "error", None) if event else None
        if error is not None:
            while error.cause is not None:  # Dagster wraps the asset's own exception; show that one
                error = error.cause
            return f"run {run.run_id} failed: {' '.join(error.message.split())[:300]}"
    return f"run {run.run_id} failed"


async def _settle(
    broker: Broker,
    staging: Staging,
    manifest: Manifest,
    outcome: RunOutcome,
    failure: str,
    nats: NatsResource,
    ingest: IngestResource,
    report: TickReport,
) -> None:
    """Ack a succeeded batch; NAK (growing delay) or dead-letter a failed one; then drop its files.

    Read in chunks: a batch can hold hundreds of thousands of messages, and their bodies are
    needed only for the few that are dead-lettered.
    """
    if outcome is RunOutcome.SUCCEEDED:
        for rows in staging.iter_deliveries(manifest.batch_id, ["reply"], chunk=SETTLE_CHUNK):
            report.acked += await broker.ack(row["reply"] for row in rows)
    else:
        for rows in staging.iter_deliveries(manifest.batch_id, chunk=SETTLE_CHUNK):
            naks: list[tuple[str, float]] = []
            dead: list[tuple[Delivery, str]] = []
            for row in rows:
                action = decide(
                    outcome,
                    num_delivered=row["num_delivered"],
                    max_deliver=nats.max_deliver,
                    nak_base_seconds=ingest.nak_delay_seconds,
                    failure=failure,
                    may_dead_letter=row["stream"] != DEADLETTER.name,
                )
                if action is None:  # pragma: no cover - outcome is not PENDING here
                    continue
                if action.kind is Kind.DEAD_LETTER:
                    dead.append((delivery_from_row(row), action.reason))
                else:
                    naks.append((row["reply"], action.delay_seconds))
            report.dead_lettered += await broker.dead_letter(dead)
            report.nacked += await broker.nak(naks)
    staging.remove(manifest.batch_id)
    _kept_alive_at.pop(manifest.batch_id, None)
    report.settled_batches += 1


def _not_started(run: dg.DagsterRun | None) -> bool:
    """No run yet, or one still in the queue (a STARTING or STARTED run has left it)."""
    return run is None or run.status in (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED)


def _keep_alive_due(manifest: Manifest, ack_wait_seconds: int, now: float) -> bool:
    """+WPI only once a quarter of ack_wait has passed since the fetch or the last +WPI.

    Re-arming every message of every waiting batch on every tick cost more than the fetch itself
    on large batches; a quarter of ack_wait leaves three more ticks' worth of margin.
    """
    last = _kept_alive_at.get(manifest.batch_id)
    if last is None:  # not kept alive by this process yet: time it from the batch's first fetch
        last = datetime.fromisoformat(manifest.created_at).timestamp()
    return now - last >= ack_wait_seconds / 4


async def _rescue_exhausted(broker: Broker, nats: NatsResource, report: TickReport) -> None:
    """Copy to DEADLETTER what the server stopped delivering on its own (see ensure_advisory_capture)."""
    found = await broker.exhausted(nats.durable_prefix)
    rescue = [
        (
            d,
            f"the server gave up after {d.num_delivered} deliveries that were never acked (NATS_MAX_DELIVER="
            f"{nats.max_deliver}); the pipeline was not able to settle them",
        )
        for d, _, _ in found
        if d is not None
    ]
    report.dead_lettered += await broker.dead_letter(rescue)
    for d, info, _ in found:
        if d is None:
            report.problem = (
                f"{info.get('stream')} #{info.get('stream_seq')} ran out of deliveries and is no longer in the "
                "stream (removed by its retention), so it could not be copied to DEADLETTER"
            )
    if found:
        await broker.ack(reply for _, _, reply in found)


async def _fetch(broker: Broker, nats: NatsResource, want: int, max_bytes: int) -> list[Delivery]:
    """One chunk of a micro-batch across the three consumers: a fair share each first, then what is left."""
    out: list[Delivery] = []
    used_bytes = 0
    share = max(1, want // len(STREAMS))
    for fair in (True, False):
        for spec in STREAMS:
            room = want - len(out)
            ask = min(share, room) if fair else room
            if ask <= 0:
                return out
            try:
                got = await broker.pull(
                    spec.name,
                    consumer_name(nats.durable_prefix, spec),
                    batch=ask,
                    max_bytes=max_bytes - used_bytes,
                )
            except MessageTooLarge:
                if used_bytes == 0:
                    raise
                return out  # the batch is full by bytes
            out.extend(got)
            used_bytes += sum(len(d.data) + len(d.subject) + len(d.reply) for d in got)
    return out


async def _stage_one(
    broker: Broker, nats: NatsResource, ingest: IngestResource, deadline: float, report: TickReport
) -> tuple[Manifest | None, bool]:
    """Fetch, validate and stage one batch chunk by chunk until it is full, the consumers are
    drained or the tick's fetch time is up. Returns (its manifest or None, whether to stop fetching)."""
    writer = ingest.staging.writer()
    stop = False
    chunk_seconds = 0.0
    try:
        while writer.size < ingest.batch_max_messages:
            started = time.monotonic()
            if started + chunk_seconds >= deadline:  # the next chunk would end past the deadline
                stop = True
                break
            want = min(FETCH_CHUNK, ingest.batch_max_messages - writer.size)
            room = ingest.batch_max_bytes - writer.bytes
            if room <= 0:
                break
            try:
                deliveries = await _fetch(broker, nats, want, room)
            except MessageTooLarge:
                if writer.size == 0:
                    raise
                break  # full by bytes
            for d in deliveries:
                report.fetched[d.stream] = report.fetched.get(d.stream, 0) + 1
            assembled = assemble(deliveries)
            if assembled.poison:
                report.poison += await broker.dead_letter(assembled.poison)
            writer.add(assembled)
            if len(deliveries) < want:  # drained (or full by bytes: then the next tick goes on)
                stop = True
                break
            chunk_seconds = time.monotonic() - started
        if writer.size == 0:
            writer.abort()
            return None, True
        return writer.close(), stop
    except BaseException:
        writer.abort()
        raise


async def _exchange(
    instance: dg.DagsterInstance,
    nats: NatsResource,
    ingest: IngestResource,
    batches: list[Manifest],
    runs: dict[str, dg.DagsterRun | None],
    report: TickReport,
    deadline: float,
) -> None:
    staging = ingest.staging
    t = time.monotonic()
    async with await Broker.connect(nats.url, "feature-pipeline-sensor", nats.auth) as broker:
        await broker.ensure_streams()
        await broker.ensure_consumers(
            nats.durable_prefix,
            max_deliver=nats.max_deliver,
            ack_wait_seconds=nats.ack_wait_seconds,
            max_ack_pending=ingest.max_ack_pending,
        )
        t = report.lap("connect", t)
        remaining: list[Manifest] = []
        now = time.time()
        for manifest in batches:
            run = runs[manifest.batch_id]
            outcome = outcome_of(run.status.value if run else None)
            if outcome is RunOutcome.PENDING:
                if "no-keepalive" not in ingest.fault_set and _keep_alive_due(manifest, nats.ack_wait_seconds, now):
                    for rows in staging.iter_deliveries(manifest.batch_id, ["reply"], chunk=SETTLE_CHUNK):
                        report.kept_alive += await broker.keep_alive(row["reply"] for row in rows)
                    _kept_alive_at[manifest.batch_id] = now
                remaining.append(manifest)
                continue
            failure = _failure_text(instance, run) if outcome is RunOutcome.FAILED and run else ""
            await _settle(broker, staging, manifest, outcome, failure, nats, ingest, report)

        report.in_flight = len(remaining)
        t = report.lap("settle", t)
        # One batch waiting for its run to start is enough: staging another behind it would only add a
        # run (seconds of start-up each); held back, the messages join the next batch instead.
        waiting = [m.batch_id for m in remaining if _not_started(runs.get(m.batch_id))]
        if waiting:
            report.holding = waiting[0]
        while not waiting and report.in_flight < ingest.max_batches_in_flight and time.monotonic() < deadline:
            try:
                staging.check_writable()
            except OSError as exc:
                report.problem = f"not fetching: staging folder {staging.root} is not writable ({exc})"
                break
            manifest, stop = await _stage_one(broker, nats, ingest, deadline, report)
            if manifest is not None:
                report.staged.append(manifest)
                report.in_flight += 1
            if stop:
                break

        t = report.lap("fetch", t)
        # After fetching: the server announces a message it gives up on only when it is next asked for messages.
        await _rescue_exhausted(broker, nats, report)
        report.stats = await collect(broker, nats.durable_prefix, remaining + report.staged)
        report.lap("observe", t)


def run_tick(
    instance: dg.DagsterInstance, nats: NatsResource, ingest: IngestResource
) -> tuple[list[dg.RunRequest], TickReport]:
    """One tick, usable without the daemon (tests call it with a test instance)."""
    started = time.monotonic()
    # Settling counts against the fetch time too: the tick should end inside the daemon's 5 s loop.
    deadline = started + ingest.fetch_seconds
    staging = ingest.staging
    batches = staging.batches()
    runs = {m.batch_id: _run_for(instance, m.batch_id) for m in batches}
    report = TickReport(in_flight=len(batches))
    report.lap("runs", started)
    try:
        asyncio.run(_exchange(instance, nats, ingest, batches, runs, report, deadline))
    except BrokerUnavailable as exc:
        report.problem = str(exc)
    except (NatsError, TimeoutError, ConnectionError) as exc:
        report.problem = f"lost NATS at {redact(nats.url)} during the tick: {exc!r}"
    except (TopologyError, OSError) as exc:
        report.problem = f"{type(exc).__name__}: {exc} (NATS {redact(nats.url)})"
    # Every staged batch without a run gets (again) a request; run_key makes a repeat a no-op.
    pending = [m for m in batches if runs[m.batch_id] is None and staging.path(m.batch_id).exists()]
    tags = {MAX_RUNTIME_TAG: str(ingest.run_timeout_seconds)}
    requests = [
        dg.RunRequest(run_key=m.batch_id, tags={**tags, BATCH_TAG: m.batch_id}) for m in [*pending, *report.staged]
    ]
    return requests, report


def _asset_events(
    stats: list[StreamStats], problem: str | None, monitoring: MonitoringResource
) -> list[dg.AssetObservation | dg.AssetCheckEvaluation]:
    if stats:
        return stream_events(stats, monitoring)
    return unreachable_evaluations(problem) if problem else []


def build_ingest_sensor(interval_seconds: int) -> dg.SensorDefinition:
    @dg.sensor(
        name=SENSOR_NAME,
        job=ingest_job,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Drains the SIGNALS, FEEDBACK and DEADLETTER durable consumers into staged micro-batches, "
        "one ingest run each, and acks a batch only after its run succeeded.",
    )
    def ingest_sensor(
        context: dg.SensorEvaluationContext, nats: NatsResource, ingest: IngestResource, monitoring: MonitoringResource
    ) -> dg.SensorResult:
        requests, report = run_tick(context.instance, nats, ingest)
        text = report.summary()
        (context.log.warning if report.problem else context.log.info)(text)
        return dg.SensorResult(
            run_requests=requests,
            asset_events=_asset_events(report.stats, report.problem, monitoring),
            skip_reason=None if requests else text,
        )

    return ingest_sensor


@dg.sensor(
    name="stream_monitor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Observes the streams and grades the lag checks every 30 s, also while ingest_sensor is "
    "stopped, so a stopped pipeline turns the checks red.",
)
def stream_monitor(
    context: dg.SensorEvaluationContext, nats: NatsResource, ingest: IngestResource, monitoring: MonitoringResource
) -> dg.SensorResult:
    problem = None
    stats: list[StreamStats] = []
    try:
        stats = asyncio.run(
            read_stream_stats(
                nats.url, nats.auth, nats.durable_prefix, ingest.staging.batches(), "feature-pipeline-monitor"
            )
        )
    except BrokerUnavailable as exc:
        problem = str(exc)
    except (NatsError, TimeoutError, ConnectionError) as exc:
        problem = f"lost NATS at {redact(nats.url)}: {exc!r}"
    except NotFoundError as exc:
        problem = f"a stream or consumer is missing ({exc.description}); ingest_sensor creates them on its next tick"
    lags = ", ".join(f"{s.stream} lag {s.consumer_lag}" for s in stats)
    return dg.SensorResult(asset_events=_asset_events(stats, problem, monitoring), skip_reason=problem or lags)
