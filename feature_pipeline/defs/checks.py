"""Asset checks: stream lag and oldest-unacked age, dead letters per hour, features vs recomputation.

The stream checks are evaluated by the sensors every tick (reported as AssetCheckEvaluation
events, so they keep updating while ingest is stopped) and can be run on demand from the UI.
The store checks run inside every ingest run, right after its commit.
"""

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from nats.errors import Error as NatsError

from feature_pipeline.broker.client import BrokerUnavailable, nats_problem, not_created
from feature_pipeline.broker.stats import read_stream_stats
from feature_pipeline.defs.instigators import ingest_sensor_state
from feature_pipeline.defs.names import AssetJob, Names
from feature_pipeline.defs.runs import DagsterRuns
from feature_pipeline.health import (
    AGE_CHECK,
    INGEST_CHECK,
    LAG_CHECK,
    TICK_STALE_SECONDS,
    CheckOutcome,
    StreamStats,
    ingest_grade,
    stream_checks,
    thresholds,
)
from feature_pipeline.ingest.fetch import staging_hold
from feature_pipeline.ingest.online import SyncResult
from feature_pipeline.ingest.tick import blocked_batches, open_every_staging
from feature_pipeline.settings import Settings
from feature_pipeline.store.feature_store import RECENT_MINUTES, StoreHealth
from feature_pipeline.store.loader import sources_for
from feature_pipeline.streams import DEADLETTER

_SEVERITY = {"warn": dg.AssetCheckSeverity.WARN, "error": dg.AssetCheckSeverity.ERROR}
# The graded figure of each stream check, named with its unit (the thresholds are in the description).
_CHECK_FIGURE = {LAG_CHECK: "consumer_lag_messages", AGE_CHECK: "oldest_unacked_age_seconds"}
# Observation figures, named with their units: the UI plots each under this name.
_OBSERVED = {
    "consumer_lag": "consumer_lag_messages",
    "num_pending": "pending_messages",
    "num_ack_pending": "unacked_messages",
    "num_redelivered": "redelivered_messages",
    "stream_messages": "stream_messages",
    "in_flight_batches": "in_flight_batches",
    "in_flight_messages": "in_flight_messages",
    "dead_letters": "dead_lettered_messages",
    "oldest_unacked_age_seconds": "oldest_unacked_age_seconds",
    "seconds_since_last_message": "seconds_since_last_message",
}


class Checks:
    """One pipeline instance's check specs, gradings and on-demand check definitions."""

    def __init__(self, names: Names) -> None:
        self.names = names
        user_features = names.user_features
        self.stream_specs = [
            spec
            for s in names.streams
            for spec in (
                dg.AssetCheckSpec(
                    LAG_CHECK, asset=names.stream(s), description="Messages pending or unacked on the consumer."
                ),
                dg.AssetCheckSpec(
                    AGE_CHECK, asset=names.stream(s), description="Age of the oldest message not yet acked."
                ),
            )
        ]
        self.dead_letters = dg.AssetCheckSpec(
            "dead_letters_last_hour",
            asset=names.table(DEADLETTER.table),
            description="Dead letters recorded in the last hour.",
        )
        self.consistency = dg.AssetCheckSpec(
            "matches_recomputation",
            asset=user_features,
            description="A sample of rows equals a recomputation from the whole history (live tables and archive) at "
            "each row's updated_at; made at most every FEATURE_PIPELINE_CONSISTENCY_EVERY_SECONDS (compared_at says "
            "when).",
        )
        self.online = dg.AssetCheckSpec(
            "matches_online_store",
            asset=user_features,
            description="A random sample of rows (FEATURE_PIPELINE_CONSISTENCY_SAMPLE, at most 1 000), read back from "
            "the online store (JetStream KV) after the run wrote its changed rows, equals user_features; made at most "
            "every FEATURE_PIPELINE_CONSISTENCY_EVERY_SECONDS (compared_at says when). Rows that differ are written "
            "again by the next run.",
        )
        self.commit_latency = dg.AssetCheckSpec(
            "commit_latency",
            asset=user_features,
            description=f"The p95 publish→commit latency (JetStream stored time to DuckDB commit) of every batch "
            f"stored in the last {RECENT_MINUTES} minutes is under FEATURE_PIPELINE_COMMIT_LATENCY_WARN_SECONDS (WARN "
            "above it, ERROR above FEATURE_PIPELINE_COMMIT_LATENCY_ERROR_SECONDS).",
        )
        self.runs = dg.AssetCheckSpec(
            "runs_not_failing_outside_messages",
            asset=user_features,
            description="No staged batch waits for a retry because its run failed for a reason outside its messages "
            "(store unreachable or not writable, disk full, lock timeout, killed worker, lost run). While one waits, "
            "the sensor fetches nothing new and no delivery is spent.",
        )
        # On the stream assets, which no run materializes: the UI shows a check's latest evaluation only while
        # it targets the asset's latest materialization, so a check on user_features that stream_monitor grades
        # every tick would read "Not Evaluated" after each batch.
        sensor, monitor = names.ingest_sensor, names.of("stream_monitor")
        self.ingest_specs = [
            dg.AssetCheckSpec(
                INGEST_CHECK,
                asset=names.stream(s),
                description=f"{sensor}, which drains this stream, is switched on and completed a tick in the last "
                f"{TICK_STALE_SECONDS} s; graded by {monitor}, which keeps running when {sensor} is stopped.",
            )
            for s in names.streams
        ]

    @property
    def in_ingest_runs(self) -> list[dg.AssetCheckSpec]:
        """The checks an ingest run evaluates on the store it has just committed."""
        return [self.dead_letters, self.consistency, self.commit_latency, self.online]

    # -- graded by the sensors, or on demand ------------------------------------------------------

    def ingest_graded(self, instance: dg.DagsterInstance, settings: Settings | None = None) -> list[dict[str, Any]]:
        """The ingest_running check of every stream, from what the instance says of the ingest sensor and,
        given the settings, from the staging the sensor would fetch into: a sensor that ticks but holds off
        fetching (a nearly full or unwritable staging folder) is not ingesting, and the check says why."""
        sensor = self.names.ingest_sensor
        try:
            grade, description, age = ingest_grade(ingest_sensor_state(instance, sensor), datetime.now(UTC), sensor)
        except Exception as exc:  # the instance's storage, or an API that moved in a Dagster upgrade
            grade, description, age = "warn", f"cannot read {sensor}'s state: {type(exc).__name__}: {exc}", None
        hold = _staging_hold(settings) if settings is not None and grade == "pass" else None
        if hold:
            grade, description = "error", f"{sensor} ticks but is not fetching: {hold}"
        return [
            {
                "asset_key": spec.asset_key,
                "check_name": INGEST_CHECK,
                "passed": grade == "pass",
                "severity": _SEVERITY.get(grade, dg.AssetCheckSeverity.WARN),
                "metadata": {} if age is None else {"seconds_since_last_tick": round(age, 1)},
                "description": description,
            }
            for spec in self.ingest_specs
        ]

    def runs_evaluation(self, blocked: list[str]) -> dg.AssetCheckEvaluation:
        """The ingest sensor grades the runs check every tick from the batches it is retrying."""
        return dg.AssetCheckEvaluation(**self._runs_graded(blocked))

    def _runs_graded(self, blocked: list[str]) -> dict[str, Any]:
        shown = "; ".join(blocked[:5]) + (f"; and {len(blocked) - 5} more" if len(blocked) > 5 else "")
        return {
            "asset_key": self.runs.asset_key,
            "check_name": self.runs.name,
            "passed": not blocked,
            "severity": dg.AssetCheckSeverity.ERROR,
            "metadata": {"batches_waiting": len(blocked)},
            "description": f"not fetching; retrying {shown}" if blocked else "no batch waits for a retry",
        }

    def stream_events(
        self, stats: list[StreamStats], problem: str | None, settings: Settings, *, warn_only: bool = False
    ) -> list[dg.AssetObservation | dg.AssetCheckEvaluation]:
        """What stream_monitor records on the stream assets: figures and graded checks, or every check failed
        with the reason when NATS could not be asked (a warning when `warn_only`: streams not made yet)."""
        if stats:
            return self._observations(stats, settings)
        severity = dg.AssetCheckSeverity.WARN if warn_only else dg.AssetCheckSeverity.ERROR
        return [*self.unreachable_evaluations(problem, severity)] if problem else []

    def ingest_has_ticked(self, instance: dg.DagsterInstance) -> bool:
        """Whether the ingest sensor has completed a tick, which creates the streams and consumers."""
        try:
            state = ingest_sensor_state(instance, self.names.ingest_sensor)
        except Exception:  # the instance cannot say: assume it has, so a missing stream stays an error
            return True
        return state is not None and state.last_tick_at is not None

    def not_created_yet(self) -> str:
        """What the stream checks say before the ingest sensor's first tick has made the streams."""
        return f"streams and consumers not created yet; {self.names.ingest_sensor} creates them on its first tick"

    def _observations(
        self, stats: list[StreamStats], settings: Settings
    ) -> list[dg.AssetObservation | dg.AssetCheckEvaluation]:
        """One observation per stream (numeric metadata, so the UI plots it) and its graded checks."""
        events: list[dg.AssetObservation | dg.AssetCheckEvaluation] = []
        for s in stats:
            figures = s.as_dict()
            meta: dict[str, Any] = {}
            for key, name in _OBSERVED.items():
                value = figures.get(key)
                if isinstance(value, int | float):
                    meta[name] = round(value, 1) if isinstance(value, float) else value
            meta["consumer"] = s.consumer
            if s.last_message_at:
                meta["last_message_at"] = dg.MetadataValue.timestamp(s.last_message_at)
            events.append(dg.AssetObservation(asset_key=self.names.stream(self.names.by_name(s.stream)), metadata=meta))
        events.extend(dg.AssetCheckEvaluation(**self._graded(o)) for o in stream_checks(stats, thresholds(settings)))
        return events

    def _graded(self, o: CheckOutcome) -> dict[str, Any]:
        """What an AssetCheckEvaluation (sensors) and an AssetCheckResult (on demand) share."""
        return {
            "asset_key": self.names.stream(self.names.by_name(o.stream)),
            "check_name": o.check,
            "passed": o.grade == "pass",
            "severity": _SEVERITY.get(o.grade, dg.AssetCheckSeverity.WARN),
            "metadata": {_CHECK_FIGURE[o.check]: round(o.value, 1)},
            "description": o.description,
        }

    def unreachable_evaluations(
        self, problem: str, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR
    ) -> list[dg.AssetCheckEvaluation]:
        """NATS cannot be asked: every stream check fails with the reason, rather than staying green."""
        return [
            dg.AssetCheckEvaluation(
                asset_key=spec.asset_key,
                check_name=spec.name,
                passed=False,
                severity=severity,
                description=problem,
            )
            for spec in self.stream_specs
        ]

    # -- evaluated by ingest runs -----------------------------------------------------------------

    def store_results(self, health: StoreHealth, settings: Settings) -> list[dg.AssetCheckResult]:
        """The checks an ingest run evaluates on the store it has just committed."""
        n, warn, error = (
            health.dead_letters_last_hour,
            settings.dead_letters_hour_warn,
            settings.dead_letters_hour_error,
        )
        return [
            self._commit_latency_result(health, settings),
            dg.AssetCheckResult(
                asset_key=self.dead_letters.asset_key,
                check_name=self.dead_letters.name,
                passed=n <= warn,
                severity=dg.AssetCheckSeverity.ERROR if n > error else dg.AssetCheckSeverity.WARN,
                metadata={"dead_letters_last_hour": n},
                description=f"{n} dead letters in the last hour (warn above {warn}, error above {error})",
            ),
            self._consistency_result(health),
        ]

    def online_result(self, synced: SyncResult) -> dg.AssetCheckResult:
        """The sample the run read back from the online store after writing it."""
        bad = list(synced.different)
        shown = _listed([repr(u) for u in bad], 10)
        return dg.AssetCheckResult(
            asset_key=self.online.asset_key,
            check_name=self.online.name,
            passed=not bad,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "rows_compared": synced.compared,
                "rows_different": len(bad),
                "bucket": synced.bucket,
                **({"compared_at": dg.MetadataValue.timestamp(synced.compared_at)} if synced.compared_at else {}),
            },
            description=f"{synced.compared} sampled rows of {synced.bucket} equal user_features"
            if not bad
            else f"{len(bad)} of {synced.compared} sampled rows of {synced.bucket} differ from user_features: {shown}",
        )

    def _commit_latency_result(self, health: StoreHealth, settings: Settings) -> dg.AssetCheckResult:
        warn, error = settings.commit_latency_warn_seconds, settings.commit_latency_error_seconds
        worst, n = health.recent_worst_p95_seconds, health.recent_batches
        limits = f"warn above {warn} s, error above {error} s"
        key, name = self.commit_latency.asset_key, self.commit_latency.name
        if worst is None:
            return dg.AssetCheckResult(
                asset_key=key,
                check_name=name,
                passed=True,
                description=f"no batch with events stored in the last {RECENT_MINUTES} minutes ({limits})",
            )
        return dg.AssetCheckResult(
            asset_key=key,
            check_name=name,
            passed=worst <= warn,
            severity=dg.AssetCheckSeverity.ERROR if worst > error else dg.AssetCheckSeverity.WARN,
            metadata={"worst_p95_seconds": round(worst, 2), "batches": n},
            description=f"worst p95 publish→commit of the {n} batches stored in the last {RECENT_MINUTES} minutes: "
            f"{worst:.1f} s ({limits})",
        )

    def _consistency_result(self, health: StoreHealth) -> dg.AssetCheckResult:
        bad = health.inconsistent_users
        checked_at = health.consistency_checked_at
        return dg.AssetCheckResult(
            asset_key=self.consistency.asset_key,
            check_name=self.consistency.name,
            passed=not bad,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "rows_checked": health.consistency_checked,
                "compared_at": dg.TimestampMetadataValue(checked_at.timestamp()) if checked_at else "never",
                "rows_differing": len(bad),
                "users_differing": _listed(bad, 50),
            },
            description=(
                f"{len(bad)} of {health.consistency_checked} sampled rows differ from a recomputation: "
                + ", ".join(bad[:20])
                if bad
                else f"{health.consistency_checked} sampled rows equal a recomputation"
            ),
        )

    # -- definitions ------------------------------------------------------------------------------

    def on_demand(self) -> list[dg.AssetChecksDefinition]:
        """The checks the sensors grade, executable from the UI too."""
        return [self._ingest_on_demand(), self._runs_on_demand(), self._streams_on_demand()]

    def _ingest_on_demand(self) -> dg.AssetChecksDefinition:
        names = self.names

        @dg.multi_asset_check(
            specs=self.ingest_specs,
            name=names.of("ingest_checks"),
            can_subset=True,
            required_resource_keys={names.resource_key},
        )
        def ingest_checks(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
            """Run from the UI: the same grading stream_monitor makes every tick."""
            for graded in self.ingest_graded(context.instance, names.settings(context)):
                if dg.AssetCheckKey(graded["asset_key"], INGEST_CHECK) in context.selected_asset_check_keys:
                    yield dg.AssetCheckResult(**graded)

        return ingest_checks

    def _runs_on_demand(self) -> dg.AssetChecksDefinition:
        names = self.names

        @dg.multi_asset_check(
            specs=[self.runs], name=names.of("runs_check"), required_resource_keys={names.resource_key}
        )
        def runs_check(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
            """Run from the UI: the same grading the ingest sensor makes every tick."""
            runs = DagsterRuns(context.instance, names.ingest_job)
            yield dg.AssetCheckResult(**self._runs_graded(blocked_batches(names.settings(context), runs)))

        return runs_check

    def _streams_on_demand(self) -> dg.AssetChecksDefinition:
        names = self.names

        @dg.multi_asset_check(
            specs=self.stream_specs,
            name=names.of("stream_checks"),
            can_subset=True,
            required_resource_keys={names.resource_key},
        )
        def stream_checks_now(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
            """Run from the UI (each check on its own, from its page): the same evaluation stream_monitor makes."""
            settings = names.settings(context)
            stats, problem, _missing = read_stats(settings, "feature-pipeline-checks")
            if problem:
                raise dg.Failure(problem)
            for o in stream_checks(stats, thresholds(settings)):
                graded = self._graded(o)
                if dg.AssetCheckKey(graded["asset_key"], o.check) in context.selected_asset_check_keys:
                    yield dg.AssetCheckResult(**graded)

        return stream_checks_now

    def job(self) -> AssetJob:
        """Checks of external assets cannot be executed from their asset page ("cannot execute without
        materializing the asset"); a check-only job can: Jobs > check_streams > Launch run."""
        return dg.define_asset_job(
            self.names.of("check_streams"),
            selection=dg.AssetSelection.checks(*(s.key for s in self.stream_specs)),
            executor_def=dg.in_process_executor,
            description=f"Grades consumer_lag and oldest_unacked_age of every stream now, as "
            f"{self.names.of('stream_monitor')} does every tick.",
        )


def read_stats(settings: Settings, client: str) -> tuple[list[StreamStats], str | None, bool]:
    """The streams' figures, or why they could not be read (a line for the tick log and the checks), and
    whether the reason is a stream or consumer that does not exist (as before the ingest sensor's first tick)."""
    try:
        with open_every_staging(settings) as stagings:
            in_flight = [m.counts for staging in stagings.values() for m in staging.batches()]
        stats = asyncio.run(
            read_stream_stats(
                settings.nats_url,
                settings.nats_auth,
                settings.durable_prefix,
                sources_for(settings.features_file),
                in_flight,
                client,
            )
        )
    except (BrokerUnavailable, NatsError, TimeoutError, ConnectionError) as exc:
        return [], nats_problem(exc, settings.nats_url), not_created(exc)
    return stats, None, False


def _staging_hold(settings: Settings) -> str | None:
    """Why the ingest sensor would hold off fetching into the configured staging now (None: it would fetch)."""
    try:
        with open_every_staging(settings) as stagings:
            return next((hold for staging in stagings.values() if (hold := staging_hold(staging))), None)
    except OSError as exc:
        return f"cannot open the staging at {settings.staging_dir}: {exc}"


def _listed(items: list[str], most: int) -> str:
    """`a, b, c and 7 more`: users named in a check's words, at most `most` of them."""
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")
