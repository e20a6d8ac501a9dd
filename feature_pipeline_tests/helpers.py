"""Helpers the test modules share: configuration for a test, events, NATS state, an in-memory run lookup,
and the feed and store environment of the store tests. Nothing here is mocked: NATS is a real
nats-server, the store a real DuckDB file; the run lookup is the seam the Dagster sensor fills."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
from hypothesis import strategies as st

from feature_pipeline import faults, shards, streams
from feature_pipeline.broker import topology
from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.defs.build import build_definitions
from feature_pipeline.defs.names import Names
from feature_pipeline.defs.resources import PipelineResource, pipeline_resource
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.ingest.failures import Cause, RunFailure, cause_of
from feature_pipeline.ingest.poison import Copier
from feature_pipeline.ingest.report import TickReport
from feature_pipeline.ingest.runs import BatchRun
from feature_pipeline.ingest.shared_staging import open_staging
from feature_pipeline.ingest.staging import FolderStaging
from feature_pipeline.ingest.tick import TickOptions, run_tick
from feature_pipeline.settings import MIB, Settings, from_raw
from feature_pipeline.store.feature_store import BatchResult, FeatureStore
from feature_pipeline.store.features import compute_features
from feature_pipeline.store.loader import sources_for
from feature_pipeline.streams import PACKAGED
from feature_pipeline.testing import consumer_states, run

SUBJECTS = (
    "signals.task.synced",
    "signals.task.completed",
    "feedback.recommendation.shown",
    "feedback.recommendation.accepted",
    "feedback.recommendation.dismissed",
)
TABLES = ("signal_events", "feedback_events", "dead_letters", "user_features", "ingested_batches")

# -- configuration ------------------------------------------------------------------------------


def settings_for(root: Path, url: str, **overrides: Any) -> Settings:
    """Settings for one test: its own paths under `root`, small batches, 3 deliveries, quick NAKs."""
    raw = {
        "nats_url": url,
        "durable_prefix": "t",
        "max_deliver": 3,
        "ack_wait_seconds": 30,
        "feature_store_path": root / "store.duckdb",
        "staging_dir": root / "staging",
        "serving_path": root / "serving" / "user_features.parquet",
        "batch_max_messages": 1000,
        "batch_max_bytes": 8 * MIB,
        "max_batches_in_flight": 4,
        "nak_delay_seconds": 1,
        "lag_warn": 100,
        "lag_error": 1000,
        "dead_letters_hour_warn": 1,
        "dead_letters_hour_error": 10,
        "consistency_every_seconds": 0,  # every run compares: tests corrupt rows and expect the next run to see it
        "archive_path": root / "archive",
        **overrides,
    }
    return from_raw({k: str(v) for k, v in raw.items()})


def changed(settings: Settings, **overrides: Any) -> Settings:
    """The same settings with some values changed, checked like any other."""
    raw = {f: str(getattr(settings, f)) for f in settings.__dataclass_fields__}
    return from_raw({**raw, **{k: str(v) for k, v in overrides.items()}})


def resource(settings: Settings) -> PipelineResource:
    return pipeline_resource(**{f: str(getattr(settings, f)) for f in settings.__dataclass_fields__})


def resources(settings: Settings, names: Names | None = None) -> dict[str, Any]:
    return {(names or Names()).resource_key: resource(settings)}


@functools.lru_cache(maxsize=8)
def definitions(settings: Settings, prefix: str = "") -> dg.Definitions:
    """The code location's definitions, as the Component builds them, with these settings."""
    return build_definitions(Names(prefix), resource(settings), settings)


# -- events and NATS ------------------------------------------------------------------------------


async def publish(url: str, items: Sequence[tuple[str, bytes]]) -> None:
    async with await Broker.connect(url) as broker:
        await topology.ensure_streams(broker, PACKAGED)
        for subject, body in items:
            await broker.js.publish(subject, body)


def synced(event_id: str, user: str = "u-1", total: int = 5) -> tuple[str, bytes]:
    data = {"provider": "todoist", "tasks_total": total, "tasks_completed": 1}
    return "signals.task.synced", make_envelope(event_id, "task.synced", user, datetime.now(UTC), data)


def lag(settings: Settings) -> dict[str, int]:
    infos = run(consumer_states(settings.nats_url, settings.durable_prefix, sources_for(settings.features_file)))
    return {k: v.num_pending + v.num_ack_pending for k, v in infos.items()}


def redeliveries(settings: Settings) -> int:
    """Deliveries beyond the first, over every consumer: each delivery takes a consumer sequence number,
    and with one consumer per stream the last stream sequence delivered is the number of messages."""
    infos = run(consumer_states(settings.nats_url, settings.durable_prefix))
    return sum(i.delivered.consumer_seq - i.delivered.stream_seq for i in infos.values() if i.delivered)


def caught_up(
    settings: Settings, names: tuple[str, ...] = ("SIGNALS", "FEEDBACK", "DEADLETTER"), timeout: float = 10.0
) -> bool:
    """Every consumer at lag 0. JetStream applies acks asynchronously after the flush that delivered
    them, so give it a moment (on a busy machine it can take one) instead of reading once."""
    deadline = time.monotonic() + timeout
    while any(n for name, n in lag(settings).items() if name in names):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stored_ids(settings: Settings) -> list[str]:
    from feature_pipeline.testing import query

    sql = " UNION ALL ".join(f"SELECT event_id FROM {s.table}" for s in sources_for(settings.features_file))
    return [r[0] for r in query(Path(settings.feature_store_path), sql)]


# -- the batch lifecycle without Dagster ------------------------------------------------------------


@dataclass
class InMemoryRuns:
    """The run lookup of the tick, as a dictionary: a batch's run is what `execute` recorded for it."""

    runs: dict[str, BatchRun] = field(default_factory=dict)
    failures: dict[str, RunFailure] = field(default_factory=dict)

    def run_for(self, batch_id: str) -> BatchRun | None:
        return self.runs.get(batch_id)

    def failure(self, run: BatchRun) -> RunFailure:
        return self.failures.get(run.run_id, RunFailure(f"run {run.run_id} failed", Cause.INFRASTRUCTURE))

    def queue(self, batch_id: str, attempt: int = 0) -> None:
        self.runs[batch_id] = BatchRun(f"run-{batch_id}-{attempt}", "QUEUED", attempt)

    def finish(
        self, batch_id: str, status: str, failure: str = "", cause: Cause = Cause.MESSAGES, attempt: int = 0
    ) -> None:
        run_id = f"run-{batch_id}-{attempt}"
        self.runs[batch_id] = BatchRun(run_id, status, attempt, time.time())
        if failure:
            self.failures[run_id] = RunFailure(failure, cause)


@dataclass
class Lifecycle:
    """Ticks and runs by hand, as the sensor and the daemon would: a run stores its batch the way the
    ingest asset does (`FeatureStore.apply_batch` of the staged folder) and records how it ended."""

    settings: Settings
    runs: InMemoryRuns = field(default_factory=InMemoryRuns)
    options: TickOptions = field(default_factory=TickOptions)
    shard_of: dict[str, int] = field(default_factory=dict)  # batch id -> its shard, from the ticks' reports

    def tick(self) -> TickReport:
        report = run_tick(self.settings, self.runs, self.options)
        self.shard_of.update(report.shard_of)
        return report

    def tick_until_request(self, timeout: float = 15) -> TickReport:
        """Tick until a batch is staged (redeliveries come back after their NAK delay)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = self.tick()
            if report.to_request:
                return report
            time.sleep(0.3)
        raise AssertionError(f"no batch staged within {timeout} s")

    def execute(self, batch_id: str, fail: bool = False, attempt: int = 0) -> bool:
        """The batch's run: True when it stored the batch (SUCCESS), False when it failed (FAILURE)."""
        hook = faults.before_commit({faults.FAIL_RUN} if fail else self.settings.fault_set)
        shard = self.shard_of.get(batch_id, 0)
        try:
            with open_staging(self.settings, shard) as staging, staging.local_copy(batch_id) as folder:
                FeatureStore.from_settings(self.settings, shard).apply_batch(
                    folder,
                    batch_id,
                    before_commit=hook,
                    dead_letter=Copier(self.settings),
                    pipeline=self.settings.durable_prefix,
                )
        except Exception as exc:
            failure = f"run run-{batch_id} failed: {exc}"
            self.runs.finish(batch_id, "FAILURE", failure, cause_of(exc), attempt)
            return False
        self.runs.finish(batch_id, "SUCCESS", attempt=attempt)
        return True

    def drain(self, timeout: float = 60.0) -> None:
        """Tick and run what the ticks ask for until every consumer is at lag 0 and nothing is staged
        (messages a killed tick had fetched come back only after ack_wait)."""
        deadline = time.monotonic() + timeout
        report = None
        while time.monotonic() < deadline:
            report = self.tick()
            for batch_id in report.to_request:
                self.execute(batch_id, attempt=report.attempts.get(batch_id, 0))
            done = not report.to_request and report.problem is None and not report.in_flight
            if done and not any(lag(self.settings).values()):
                return
            time.sleep(0.2)
        summary = report.summary() if report else "no tick"
        raise AssertionError(f"not drained in {timeout:.0f} s: lag {lag(self.settings)}, last tick: {summary}")


def materialize(instance: dg.DagsterInstance, settings: Settings, tags: dict[str, str]) -> dg.ExecuteInProcessResult:
    """What the daemon launches for a run request: the ingest job with the request's tags."""
    job = definitions(settings).resolve_job_def(Names().ingest_job)
    return job.execute_in_process(instance=instance, tags=tags, raise_on_error=False)


class DagsterLifecycle(Lifecycle):
    """The same, with Dagster in the loop: runs are found on a Dagster instance and are real runs of
    the ingest asset (`dg.materialize` with the batch's tags)."""

    def __init__(self, settings: Settings, instance: dg.DagsterInstance) -> None:
        from feature_pipeline.defs.runs import DagsterRuns

        super().__init__(settings)
        self.instance = instance
        self.dagster_runs = DagsterRuns(instance)

    def tick(self) -> TickReport:
        report = run_tick(self.settings, self.dagster_runs, self.options)
        self.shard_of.update(report.shard_of)
        return report

    def execute(self, batch_id: str, fail: bool = False, attempt: int = 0) -> bool:
        from feature_pipeline.defs.runs import batch_tags

        settings = changed(self.settings, faults=faults.FAIL_RUN) if fail else self.settings
        tags = batch_tags(batch_id, settings.run_timeout_seconds, attempt)
        tags.update(shards.run_tags(settings, self.shard_of.get(batch_id, 0)))
        return materialize(self.instance, settings, tags).success


# -- the store without NATS -----------------------------------------------------------------------


def data_for(subject: str, n: int = 0) -> dict[str, Any]:
    """A valid `data` object for each modelled subject."""
    if subject == "signals.task.synced":
        return {"provider": "todoist", "tasks_total": n + 3, "tasks_completed": n}
    if subject == "signals.task.completed":
        return {"task_id": f"t-{n}"}
    return {"recommendation_id": f"r-{n}", "item_id": f"i-{n}"}


@dataclass
class Feed:
    """Builds Deliveries the way `Broker.pull` does, with per-stream sequence numbers."""

    seqs: dict[str, int] = field(default_factory=dict)

    def next_seq(self, stream: str) -> int:
        self.seqs[stream] = self.seqs.get(stream, 0) + 1
        return self.seqs[stream]

    def event(
        self,
        event_id: str,
        subject: str,
        user_id: str,
        occurred_at: datetime,
        data: dict[str, Any] | None = None,
        *,
        seq: int | None = None,
        num_delivered: int = 1,
    ) -> Delivery:
        stream = "SIGNALS" if subject.startswith("signals.") else "FEEDBACK"
        seq = self.next_seq(stream) if seq is None else seq
        ns = time.time_ns()
        body = make_envelope(event_id, subject.partition(".")[2], user_id, occurred_at, data or data_for(subject))
        reply = f"$JS.ACK.{stream}.c.{num_delivered}.{seq}.{seq}.{ns}.0"
        return Delivery(stream, subject, reply, body, None, seq, num_delivered, ns)

    def dead_letter(self, original_stream: str, original_seq: int, reason: str = "gave up") -> Delivery:
        """A copy `Broker.dead_letter` put on the DEADLETTER stream."""
        seq = self.next_seq("DEADLETTER")
        ns = time.time_ns()
        headers = {
            streams.H_STREAM: original_stream,
            streams.H_SUBJECT: "signals.task.synced",
            streams.H_SEQUENCE: str(original_seq),
            streams.H_DELIVERIES: "5",
            streams.H_REASON: reason,
            streams.H_AT: datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            streams.H_STORED: str(ns),
        }
        reply = f"$JS.ACK.DEADLETTER.c.1.{seq}.{seq}.{ns}.0"
        return Delivery("DEADLETTER", "deadletter.signals.task.synced", reply, b"{oops", headers, seq, 1, ns)


@dataclass
class Env:
    store: FeatureStore
    staging: FolderStaging
    feed: Feed

    def stage(self, deliveries: Sequence[Delivery]) -> str:
        return self.staging.stage(deliveries).batch_id

    def apply(self, deliveries: Sequence[Delivery], **kw: Any) -> BatchResult:
        batch_id = self.stage(deliveries)
        return self.store.apply_batch(self.staging.path(batch_id), batch_id, **kw)

    @contextlib.contextmanager
    def con(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self.store.connect()
        try:
            yield con
        finally:
            con.close()

    def count(self, table: str) -> int:
        with self.con() as con:
            return int(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])

    def features(self) -> dict[str, dict[str, Any]]:
        return self.table("user_features")

    def table(self, name: str, where: str = "") -> dict[str, dict[str, Any]]:
        """Rows keyed by user_id."""
        with self.con() as con:
            cur = con.execute(f"SELECT * FROM {name} {where}")
            names = [d[0] for d in cur.description]
            return {r[names.index("user_id")]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        with self.con() as con:
            return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}

    def reference(self, as_of: datetime, users: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Rows recomputed from the raw tables, as of `as_of`, without writing."""
        with self.con() as con:
            return compute_features(con, self.store.registry, as_of, users)


def make_env(root: Path, registry: Any = None) -> Env:
    store = FeatureStore(
        root / "fs.duckdb",
        registry=registry,
        allowed_lateness=timedelta(hours=1),
    )
    return Env(store, FolderStaging(root / "staging"), Feed())


def assert_rows_match_reference(env: Env) -> dict[str, dict[str, Any]]:
    """Every user_features row equals the reference query at that row's own updated_at."""
    rows = env.features()
    for user, row in rows.items():
        assert env.reference(row["updated_at"], [user]) == {user: row}, user
    return rows


EVENT = st.tuples(
    st.sampled_from(["u-1", "u-2", "u-3"]),
    st.sampled_from(SUBJECTS),
    st.integers(0, 10 * 86_400_000),  # occurred this many ms ago: the last 10 days
    st.integers(0, 50),
)


def deliveries_for(
    feed: Feed, events: list[tuple[str, str, int, int]], draw: st.DataObject, end: datetime
) -> tuple[list[Delivery], list[int]]:
    """The events (user, subject, ms before `end`, n) as NATS might deliver them: each 1-3 times, in any
    order, a repeat either a redelivery (same sequence) or a republish (new sequence); and batch cuts."""
    copies = draw.draw(st.lists(st.integers(1, 3), min_size=len(events), max_size=len(events)), label="copies")
    plan = draw.draw(st.permutations([i for i, c in enumerate(copies) for _ in range(c)]), label="order")
    cuts = sorted(set(draw.draw(st.lists(st.integers(0, len(plan)), max_size=4), label="cuts")))
    first_seq: dict[int, int] = {}
    times_sent: dict[int, int] = {}
    deliveries = []
    for i in plan:
        user, subject, ms_ago, n = events[i]
        times_sent[i] = times_sent.get(i, 0) + 1
        redelivery = i in first_seq and draw.draw(st.booleans(), label="redelivery")
        d = feed.event(
            f"evt-{i}",
            subject,
            user,
            end - timedelta(milliseconds=ms_ago),
            data_for(subject, n),
            seq=first_seq[i] if redelivery else None,
            num_delivered=times_sent[i] if redelivery else 1,
        )
        first_seq.setdefault(i, d.stream_seq)
        deliveries.append(d)
    return deliveries, cuts


def unchecked(settings: Settings, **changes: Any) -> Settings:
    """Settings with values the checks forbid (say, ack_wait below 10 s), for tests that need a fast clock."""
    return dataclasses.replace(settings, **changes)


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """Write a file that leaves `leave_bytes` free on folder's disk (0: until the disk is full)."""
    filler = folder / "filler"
    with open(filler, "ab") as fh:
        while (free := shutil.disk_usage(folder).free) > leave_bytes:
            try:
                fh.write(b"\0" * min(free - leave_bytes, 1 << 20))
                fh.flush()
            except OSError:  # ENOSPC: full
                break
    return filler
