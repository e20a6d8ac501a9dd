"""The window clock: when no ingest run has happened for a while, a run moves user_features to now.

Windows slide with the wall clock: each run recomputes the users whose events crossed a window
edge since the previous run. While events flow, ingest runs do that every few seconds; when
they stop, this schedule does it every REFRESH_MINUTES, so a user's 24 h count falls to 0 at
most that late, with no new event needed.
"""

import dagster as dg

from feature_pipeline.defs.assets import REFRESH_TAG
from feature_pipeline.defs.names import AssetJob, Names
from feature_pipeline.defs.runs import MAX_RUNTIME_TAG

REFRESH_MINUTES = 5
_BUSY = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def build_refresh_schedule(names: Names, job: AssetJob) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=names.of("refresh_feature_windows"),
        cron_schedule=f"*/{REFRESH_MINUTES} * * * *",
        job=job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        required_resource_keys={names.resource_key},
        description=f"Every {REFRESH_MINUTES} min, unless an ingest run just did it: recompute the rows whose "
        "windows moved, so features slide with time when no events arrive.",
    )
    def refresh_feature_windows(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        instance, job_name = context.instance, names.ingest_job
        if instance.get_run_records(filters=dg.RunsFilter(job_name=job_name, statuses=_BUSY), limit=1):
            return dg.SkipReason("an ingest run is queued or running; it moves the clock")
        done = instance.get_run_records(
            filters=dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
        )
        now = context.scheduled_execution_time.timestamp() if context.scheduled_execution_time else None
        if done and done[0].end_time and now and now - done[0].end_time < (REFRESH_MINUTES - 1) * 60:
            return dg.SkipReason("an ingest run moved the clock less than a refresh period ago")
        timeout = names.settings(context).run_timeout_seconds
        return dg.RunRequest(tags={REFRESH_TAG: "windows", MAX_RUNTIME_TAG: str(timeout)})

    return refresh_feature_windows
