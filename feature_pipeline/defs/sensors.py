"""The sensors: the ingest sensor drives the batch lifecycle; the stream monitor keeps watching when it is off.

The lifecycle itself (settle, keep alive, fetch, stage) is `feature_pipeline.ingest.tick`, plain
Python; this module turns a tick's report into run requests, observations and a log line.
"""

import dagster as dg

from feature_pipeline import shards
from feature_pipeline.defs.checks import Checks, read_stats
from feature_pipeline.defs.names import AssetJob, Names
from feature_pipeline.defs.runs import DagsterRuns, batch_tags, run_key
from feature_pipeline.defs.snapshots import keep_days_current
from feature_pipeline.ingest.report import TickReport
from feature_pipeline.ingest.tick import run_tick
from feature_pipeline.settings import Settings

# The daemon looks at sensors every 5 s, so an interval under 5 s means "every loop"; the UI shows the
# interval itself as "Frequency", so the description says what it really is.
DAEMON_LOOP_SECONDS = 5


def _log(context: dg.SensorEvaluationContext, report: TickReport) -> None:
    (context.log.warning if report.problem or report.retrying else context.log.info)(report.summary())


def _cadence(interval_seconds: int) -> str:
    if interval_seconds < DAEMON_LOOP_SECONDS:
        return (
            f"Ticks every {DAEMON_LOOP_SECONDS} s, the daemon's sensor loop (the {interval_seconds} s shown as its "
            "frequency is the minimum interval Dagster allows between ticks)."
        )
    return f"Ticks at least {interval_seconds} s after the previous tick ended, on the daemon's 5 s loop."


def build_ingest_sensor(names: Names, job: AssetJob, checks: Checks, interval_seconds: int) -> dg.SensorDefinition:
    @dg.sensor(
        name=names.ingest_sensor,
        job=job,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={names.resource_key},
        description=f"Drains the {', '.join(s.name for s in names.streams)} durable consumers into staged "
        "micro-batches, "
        f"one {names.ingest_job} run each, and acks a batch only after its run succeeded. "
        + _cadence(interval_seconds),
    )
    def ingest_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        settings = names.settings(context)
        report = run_tick(settings, DagsterRuns(context.instance, names.ingest_job))
        _log(context, report)
        return to_result(report, settings, checks)

    return ingest_sensor


def to_result(report: TickReport, settings: Settings, checks: Checks) -> dg.SensorResult:
    """A tick's report as Dagster sees it: one run request per batch that needs a run, and the runs check.
    The streams are observed and graded by stream_monitor alone, at a pace that keeps an hour of plots."""
    timeout = settings.run_timeout_seconds
    requests = []
    for batch_id in report.to_request:
        attempt = report.attempts.get(batch_id, 0)
        tags = {**batch_tags(batch_id, timeout, attempt), **shards.run_tags(settings, report.shard_of.get(batch_id, 0))}
        requests.append(dg.RunRequest(run_key=run_key(batch_id, attempt), tags=tags))
    return dg.SensorResult(
        run_requests=requests,
        asset_events=[checks.runs_evaluation(report.retrying)],
        skip_reason=None if requests else report.summary(),
    )


def _snapshot_days(context: dg.SensorEvaluationContext, names: Names, settings: Settings) -> str:
    """The days that became snapshot days (a day just ended, or the history grew), for the tick's line."""
    try:
        added = keep_days_current(context.instance, names, settings)
    except Exception as exc:  # the instance's storage: the next tick tries again
        return f"; could not list the new snapshot days: {type(exc).__name__}: {exc}"
    return f"; {added}" if added else ""


def build_stream_monitor(names: Names, checks: Checks, interval_seconds: int) -> dg.SensorDefinition:
    @dg.sensor(
        name=names.of("stream_monitor"),
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={names.resource_key},
        description=f"Observes the streams and grades the lag checks and ingest_running every "
        f"{interval_seconds} s, also while {names.ingest_sensor} is stopped, so a stopped pipeline turns the "
        "checks red.",
    )
    def stream_monitor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        settings = names.settings(context)
        stats, problem, missing = read_stats(settings, "feature-pipeline-monitor")
        # Before the ingest sensor's first tick the streams do not exist yet: a warning that says so, not an error.
        early = missing and not checks.ingest_has_ticked(context.instance)
        problem = checks.not_created_yet() if early else problem
        ingest = checks.ingest_graded(context.instance, settings)
        days = _snapshot_days(context, names, settings)
        lags = ", ".join(f"{s.stream} lag {s.consumer_lag}" for s in stats)
        return dg.SensorResult(
            asset_events=[
                *checks.stream_events(stats, problem, settings, warn_only=early),
                *(dg.AssetCheckEvaluation(**g) for g in ingest),
            ],
            skip_reason=f"{problem or lags}; {ingest[0]['description']}{days}",
        )

    return stream_monitor
