"""The window clock: when no ingest run has happened for a while, a run moves user_features to now.

Windows slide with the wall clock: each run recomputes the users whose events crossed a window
edge since the previous run. While events flow, ingest runs do that every few seconds; when
they stop, this schedule does it every REFRESH_MINUTES, so a user's 24 h count falls to 0 at
most that late, with no new event needed.
"""

import dagster as dg

from feature_pipeline import shards
from feature_pipeline.defs.assets import REFRESH_TAG
from feature_pipeline.defs.names import AssetJob, Names
from feature_pipeline.defs.runs import MAX_RUNTIME_TAG

REFRESH_MINUTES = 5
_BUSY = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def build_refresh_schedule(names: Names, job: AssetJob, shard_count: int = 1) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=names.of("refresh_feature_windows"),
        cron_schedule=f"*/{REFRESH_MINUTES} * * * *",
        job=job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        required_resource_keys={names.resource_key},
        description=f"Every {REFRESH_MINUTES} min, unless an ingest run just did it: recompute the rows whose "
        "windows moved, so features slide with time when no events arrive"
        + (f" (one run per shard, on its worker: {shard_count} shards)." if shard_count > 1 else "."),
    )
    def refresh_feature_windows(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        settings = names.settings(context)
        now = context.scheduled_execution_time.timestamp() if context.scheduled_execution_time else None
        requests, skipped = [], []
        for shard in range(settings.shards):
            tags = shards.run_tags(settings, shard)
            why = _moved_lately(context.instance, names.ingest_job, tags, now)
            if why:
                skipped.append(why if settings.shards == 1 else f"shard {shard}: {why}")
                continue
            run_tags = {REFRESH_TAG: "windows", MAX_RUNTIME_TAG: str(settings.run_timeout_seconds), **tags}
            requests.append(dg.RunRequest(run_key=None, tags=run_tags))
        return requests or dg.SkipReason("; ".join(skipped))

    return refresh_feature_windows


def _moved_lately(instance: dg.DagsterInstance, job_name: str, tags: dict[str, str], now: float | None) -> str | None:
    """Why a shard's clock needs no run now (one of its ingest runs is under way or just moved it), or None."""
    shard_tag = {k: v for k, v in tags.items() if k == shards.SHARD_TAG}
    if instance.get_run_records(filters=dg.RunsFilter(job_name=job_name, statuses=_BUSY, tags=shard_tag), limit=1):
        return "an ingest run is queued or running; it moves the clock"
    done = instance.get_run_records(
        filters=dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.SUCCESS], tags=shard_tag), limit=1
    )
    if done and done[0].end_time and now and now - done[0].end_time < (REFRESH_MINUTES - 1) * 60:
        return "an ingest run moved the clock less than a refresh period ago"
    return None
