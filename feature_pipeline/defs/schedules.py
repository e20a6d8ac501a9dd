"""The window clock: when no ingest run has happened for a while, a run moves user_features to now.

Windows slide with the wall clock: each run recomputes the users whose events crossed a window
edge since the previous run. While events flow, ingest runs do that every few seconds; when
they stop, this schedule does it every REFRESH_MINUTES, so a user's 24 h count falls to 0 at
most that late, with no new event needed.
"""

import dagster as dg

from feature_pipeline.defs.assets import REFRESH_TAG, ingest_job
from feature_pipeline.defs.resources import PipelineResource
from feature_pipeline.defs.runs import MAX_RUNTIME_TAG

REFRESH_MINUTES = 5


@dg.schedule(
    name="refresh_feature_windows",
    cron_schedule=f"*/{REFRESH_MINUTES} * * * *",
    job=ingest_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=f"Every {REFRESH_MINUTES} min, unless an ingest run just did it: recompute the rows whose "
    "windows moved, so features slide with time when no events arrive.",
)
def refresh_feature_windows(
    context: dg.ScheduleEvaluationContext, pipeline: PipelineResource
) -> dg.RunRequest | dg.SkipReason:
    busy = context.instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=ingest_job.name,
            statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
        ),
        limit=1,
    )
    if busy:
        return dg.SkipReason("an ingest run is queued or running; it moves the clock")
    done = context.instance.get_run_records(
        filters=dg.RunsFilter(job_name=ingest_job.name, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
    )
    now = context.scheduled_execution_time.timestamp() if context.scheduled_execution_time else None
    if done and done[0].end_time and now and now - done[0].end_time < (REFRESH_MINUTES - 1) * 60:
        return dg.SkipReason("an ingest run moved the clock less than a refresh period ago")
    return dg.RunRequest(tags={REFRESH_TAG: "windows", MAX_RUNTIME_TAG: str(pipeline.settings.run_timeout_seconds)})
