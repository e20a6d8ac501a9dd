"""The sensors: the ingest sensor drives the batch lifecycle; the stream monitor keeps watching when it is off.

The lifecycle itself (settle, keep alive, fetch, stage) is `feature_pipeline.ingest.tick`, plain
Python; this module turns a tick's report into run requests, observations and a log line.
"""

import dagster as dg

from feature_pipeline.defs.assets import ingest_job
from feature_pipeline.defs.checks import ingest_graded, read_stats, runs_evaluation, stream_events
from feature_pipeline.defs.resources import PipelineResource
from feature_pipeline.defs.runs import DagsterRuns, batch_tags, run_key
from feature_pipeline.health import INGEST_SENSOR
from feature_pipeline.ingest.report import TickReport
from feature_pipeline.ingest.tick import run_tick
from feature_pipeline.settings import Settings

# The stream plots keep about the last 100 observations: one every 40 s is an hour of history.
MONITOR_INTERVAL_SECONDS = 40


def _log(context: dg.SensorEvaluationContext, report: TickReport) -> None:
    (context.log.warning if report.problem or report.retrying else context.log.info)(report.summary())


def build_ingest_sensor(interval_seconds: int) -> dg.SensorDefinition:
    @dg.sensor(
        name=INGEST_SENSOR,
        job=ingest_job,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Drains the SIGNALS, FEEDBACK and DEADLETTER durable consumers into staged micro-batches, "
        "one ingest run each, and acks a batch only after its run succeeded.",
    )
    def ingest_sensor(context: dg.SensorEvaluationContext, pipeline: PipelineResource) -> dg.SensorResult:
        settings = pipeline.settings
        report = run_tick(settings, DagsterRuns(context.instance))
        _log(context, report)
        return to_result(report, settings)

    return ingest_sensor


def to_result(report: TickReport, settings: Settings) -> dg.SensorResult:
    """A tick's report as Dagster sees it: one run request per batch that needs a run, and the runs check.
    The streams are observed and graded by stream_monitor alone, at a pace that keeps an hour of plots."""
    timeout = settings.run_timeout_seconds
    requests = []
    for batch_id in report.to_request:
        attempt = report.attempts.get(batch_id, 0)
        requests.append(dg.RunRequest(run_key=run_key(batch_id, attempt), tags=batch_tags(batch_id, timeout, attempt)))
    return dg.SensorResult(
        run_requests=requests,
        asset_events=[runs_evaluation(report.retrying)],
        skip_reason=None if requests else report.summary(),
    )


@dg.sensor(
    name="stream_monitor",
    minimum_interval_seconds=MONITOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"Observes the streams and grades the lag checks and ingest_running every {MONITOR_INTERVAL_SECONDS} "
    "s, also while ingest_sensor is stopped, so a stopped pipeline turns the checks red.",
)
def stream_monitor(context: dg.SensorEvaluationContext, pipeline: PipelineResource) -> dg.SensorResult:
    settings = pipeline.settings
    stats, problem = read_stats(settings, "feature-pipeline-monitor")
    ingest = ingest_graded(context.instance)
    lags = ", ".join(f"{s.stream} lag {s.consumer_lag}" for s in stats)
    return dg.SensorResult(
        asset_events=[*stream_events(stats, problem, settings), *(dg.AssetCheckEvaluation(**g) for g in ingest)],
        skip_reason=f"{problem or lags}; {ingest[0]['description']}",
    )
