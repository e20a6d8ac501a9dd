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
from nats.js.errors import NotFoundError

from feature_pipeline.broker.auth import redact
from feature_pipeline.broker.client import BrokerUnavailable
from feature_pipeline.broker.stats import read_stream_stats
from feature_pipeline.defs.instigators import ingest_sensor_state
from feature_pipeline.defs.resources import PipelineResource
from feature_pipeline.defs.streams import stream_key
from feature_pipeline.health import (
    AGE_CHECK,
    INGEST_CHECK,
    INGEST_SENSOR,
    LAG_CHECK,
    TICK_STALE_SECONDS,
    CheckOutcome,
    StreamStats,
    ingest_grade,
    stream_checks,
    thresholds,
)
from feature_pipeline.ingest.shared_staging import open_staging
from feature_pipeline.ingest.tick import blocked_batches
from feature_pipeline.settings import Settings
from feature_pipeline.store.feature_store import RECENT_MINUTES, StoreHealth
from feature_pipeline.streams import BY_NAME, DEADLETTER, STREAMS

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

STREAM_CHECK_SPECS = [
    spec
    for s in STREAMS
    for spec in (
        dg.AssetCheckSpec(LAG_CHECK, asset=stream_key(s), description="Messages pending or unacked on the consumer."),
        dg.AssetCheckSpec(AGE_CHECK, asset=stream_key(s), description="Age of the oldest message not yet acked."),
    )
]
DEAD_LETTERS_CHECK = dg.AssetCheckSpec(
    "dead_letters_last_hour", asset=DEADLETTER.table, description="Dead letters recorded in the last hour."
)
CONSISTENCY_CHECK = dg.AssetCheckSpec(
    "matches_recomputation",
    asset="user_features",
    description="A sample of rows equals a recomputation from the whole history (live tables and archive) at each "
    "row's updated_at; made at most every FEATURE_PIPELINE_CONSISTENCY_EVERY_SECONDS (compared_at says when).",
)

COMMIT_LATENCY_CHECK = dg.AssetCheckSpec(
    "commit_latency",
    asset="user_features",
    description=f"The p95 publish→commit latency (JetStream stored time to DuckDB commit) of every batch stored in "
    f"the last {RECENT_MINUTES} minutes is under FEATURE_PIPELINE_COMMIT_LATENCY_WARN_SECONDS (WARN above it, ERROR "
    "above FEATURE_PIPELINE_COMMIT_LATENCY_ERROR_SECONDS).",
)

RUNS_CHECK = dg.AssetCheckSpec(
    "runs_not_failing_outside_messages",
    asset="user_features",
    description="No staged batch waits for a retry because its run failed for a reason outside its messages "
    "(store unreachable or not writable, disk full, lock timeout, killed worker, lost run). While one waits, the "
    "sensor fetches nothing new and no delivery is spent.",
)


# On the stream assets, which no run materializes: the UI shows a check's latest evaluation only while
# it targets the asset's latest materialization, so a check on user_features that stream_monitor grades
# every 40 s would read "Not Evaluated" after each batch.
INGEST_CHECK_SPECS = [
    dg.AssetCheckSpec(
        INGEST_CHECK,
        asset=stream_key(s),
        description=f"{INGEST_SENSOR}, which drains this stream, is switched on and completed a tick in the last "
        f"{TICK_STALE_SECONDS} s; graded by stream_monitor, which keeps running when {INGEST_SENSOR} is stopped.",
    )
    for s in STREAMS
]


def ingest_graded(instance: dg.DagsterInstance) -> list[dict[str, Any]]:
    """The ingest_running check of every stream, from what the instance says of the ingest sensor."""
    try:
        grade, description, age = ingest_grade(ingest_sensor_state(instance), datetime.now(UTC))
    except Exception as exc:  # the instance's storage, or an API that moved in a Dagster upgrade
        grade, description, age = "warn", f"cannot read {INGEST_SENSOR}'s state: {type(exc).__name__}: {exc}", None
    return [
        {
            "asset_key": spec.asset_key,
            "check_name": INGEST_CHECK,
            "passed": grade == "pass",
            "severity": _SEVERITY.get(grade, dg.AssetCheckSeverity.WARN),
            "metadata": {} if age is None else {"seconds_since_last_tick": round(age, 1)},
            "description": description,
        }
        for spec in INGEST_CHECK_SPECS
    ]


@dg.multi_asset_check(specs=INGEST_CHECK_SPECS, name="ingest_checks", can_subset=True)
def ingest_check_on_demand(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
    """Run from the UI: the same grading stream_monitor makes every tick."""
    for graded in ingest_graded(context.instance):
        if dg.AssetCheckKey(graded["asset_key"], INGEST_CHECK) in context.selected_asset_check_keys:
            yield dg.AssetCheckResult(**graded)


def runs_evaluation(blocked: list[str]) -> dg.AssetCheckEvaluation:
    """The ingest sensor grades RUNS_CHECK every tick from the batches it is retrying."""
    return dg.AssetCheckEvaluation(**_runs_graded(blocked))


def _runs_graded(blocked: list[str]) -> dict[str, Any]:
    shown = "; ".join(blocked[:5]) + (f"; and {len(blocked) - 5} more" if len(blocked) > 5 else "")
    return {
        "asset_key": RUNS_CHECK.asset_key,
        "check_name": RUNS_CHECK.name,
        "passed": not blocked,
        "severity": dg.AssetCheckSeverity.ERROR,
        "metadata": {"batches_waiting": len(blocked)},
        "description": f"not fetching; retrying {shown}" if blocked else "no batch waits for a retry",
    }


@dg.asset_check(asset="user_features", name=RUNS_CHECK.name, description=RUNS_CHECK.description)
def runs_check_on_demand(context: dg.AssetCheckExecutionContext, pipeline: PipelineResource) -> dg.AssetCheckResult:
    """Run from the UI: the same grading the ingest sensor makes every tick."""
    from feature_pipeline.defs.runs import DagsterRuns

    blocked = blocked_batches(pipeline.settings, DagsterRuns(context.instance))
    return dg.AssetCheckResult(**_runs_graded(blocked))


def read_stats(settings: Settings, client: str) -> tuple[list[StreamStats], str | None]:
    """The streams' figures, or why they could not be read (a line for the tick log and the checks)."""
    try:
        with open_staging(settings) as staging:
            in_flight = [m.counts for m in staging.batches()]
        stats = asyncio.run(
            read_stream_stats(settings.nats_url, settings.nats_auth, settings.durable_prefix, in_flight, client)
        )
    except BrokerUnavailable as exc:
        return [], str(exc)
    except NotFoundError as exc:  # before NatsError, which it is a kind of
        return [], f"a stream or consumer is missing ({exc.description}); ingest_sensor creates them on its next tick"
    except (NatsError, TimeoutError, ConnectionError) as exc:
        return [], f"lost NATS at {redact(settings.nats_url)}: {exc!r}"
    return stats, None


def stream_events(
    stats: list[StreamStats], problem: str | None, settings: Settings
) -> list[dg.AssetObservation | dg.AssetCheckEvaluation]:
    """What a sensor records on the stream assets: figures and graded checks, or every check failed
    with the reason when NATS could not be asked."""
    if stats:
        return _observations(stats, settings)
    return [*unreachable_evaluations(problem)] if problem else []


def _observations(stats: list[StreamStats], settings: Settings) -> list[dg.AssetObservation | dg.AssetCheckEvaluation]:
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
        events.append(dg.AssetObservation(asset_key=stream_key(BY_NAME[s.stream]), metadata=meta))
    events.extend(dg.AssetCheckEvaluation(**_graded(o)) for o in stream_checks(stats, thresholds(settings)))
    return events


def _graded(o: CheckOutcome) -> dict[str, Any]:
    """What an AssetCheckEvaluation (sensors) and an AssetCheckResult (on demand) share."""
    return {
        "asset_key": stream_key(BY_NAME[o.stream]),
        "check_name": o.check,
        "passed": o.grade == "pass",
        "severity": _SEVERITY.get(o.grade, dg.AssetCheckSeverity.WARN),
        "metadata": {_CHECK_FIGURE[o.check]: round(o.value, 1)},
        "description": o.description,
    }


def unreachable_evaluations(problem: str) -> list[dg.AssetCheckEvaluation]:
    """NATS cannot be asked: every stream check fails with the reason, rather than staying green."""
    return [
        dg.AssetCheckEvaluation(
            asset_key=spec.asset_key,
            check_name=spec.name,
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=problem,
        )
        for spec in STREAM_CHECK_SPECS
    ]


@dg.multi_asset_check(specs=STREAM_CHECK_SPECS, name="stream_checks", can_subset=True)
def stream_checks_on_demand(
    context: dg.AssetCheckExecutionContext, pipeline: PipelineResource
) -> Iterator[dg.AssetCheckResult]:
    """Run from the UI (each check on its own, from its page): the same evaluation stream_monitor makes."""
    settings = pipeline.settings
    stats, problem = read_stats(settings, "feature-pipeline-checks")
    if problem:
        raise dg.Failure(problem)
    for o in stream_checks(stats, thresholds(settings)):
        graded = _graded(o)
        if dg.AssetCheckKey(graded["asset_key"], o.check) in context.selected_asset_check_keys:
            yield dg.AssetCheckResult(**graded)


def commit_latency_result(health: StoreHealth, settings: Settings) -> dg.AssetCheckResult:
    warn, error = settings.commit_latency_warn_seconds, settings.commit_latency_error_seconds
    worst, n = health.recent_worst_p95_seconds, health.recent_batches
    limits = f"warn above {warn} s, error above {error} s"
    if worst is None:
        return dg.AssetCheckResult(
            asset_key="user_features",
            check_name=COMMIT_LATENCY_CHECK.name,
            passed=True,
            description=f"no batch with events stored in the last {RECENT_MINUTES} minutes ({limits})",
        )
    return dg.AssetCheckResult(
        asset_key="user_features",
        check_name=COMMIT_LATENCY_CHECK.name,
        passed=worst <= warn,
        severity=dg.AssetCheckSeverity.ERROR if worst > error else dg.AssetCheckSeverity.WARN,
        metadata={"worst_p95_seconds": round(worst, 2), "batches": n},
        description=f"worst p95 publish→commit of the {n} batches stored in the last {RECENT_MINUTES} minutes: "
        f"{worst:.1f} s ({limits})",
    )


# Checks of external assets cannot be executed from their asset page ("cannot execute without
# materializing the asset"); a check-only job can: Jobs > check_streams > Launch run.
stream_checks_job = dg.define_asset_job(
    "check_streams",
    selection=dg.AssetSelection.checks(*(s.key for s in STREAM_CHECK_SPECS)),
    executor_def=dg.in_process_executor,
    description="Grades consumer_lag and oldest_unacked_age of every stream now, as stream_monitor does every tick.",
)


def store_check_results(health: StoreHealth, settings: Settings) -> list[dg.AssetCheckResult]:
    """The checks an ingest run evaluates on the store it has just committed."""
    n, warn, error = health.dead_letters_last_hour, settings.dead_letters_hour_warn, settings.dead_letters_hour_error
    bad = health.inconsistent_users
    return [
        commit_latency_result(health, settings),
        dg.AssetCheckResult(
            asset_key=DEADLETTER.table,
            check_name=DEAD_LETTERS_CHECK.name,
            passed=n <= warn,
            severity=dg.AssetCheckSeverity.ERROR if n > error else dg.AssetCheckSeverity.WARN,
            metadata={"dead_letters_last_hour": n},
            description=f"{n} dead letters in the last hour (warn above {warn}, error above {error})",
        ),
        dg.AssetCheckResult(
            asset_key="user_features",
            check_name=CONSISTENCY_CHECK.name,
            passed=not bad,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "rows_checked": health.consistency_checked,
                "compared_at": dg.TimestampMetadataValue(health.consistency_checked_at.timestamp())
                if health.consistency_checked_at
                else "never",
                "rows_differing": len(bad),
                "users_differing": ", ".join(bad[:50]) + (f" and {len(bad) - 50} more" if len(bad) > 50 else ""),
            },
            description=(
                f"{len(bad)} of {health.consistency_checked} sampled rows differ from a recomputation: "
                + ", ".join(bad[:20])
                if bad
                else f"{health.consistency_checked} sampled rows equal a recomputation"
            ),
        ),
    ]
