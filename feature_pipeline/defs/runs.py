"""The batch lifecycle's view of Dagster: which run stores a batch, and why a failed one failed.

Runs are found by polling run records tagged with the batch id rather than with a
run_status_sensor, whose cursor moves on even when its handler fails (the work would be lost).
"""

from typing import Any

import dagster as dg

from feature_pipeline import shards
from feature_pipeline.ingest.failures import Cause, RunFailure
from feature_pipeline.ingest.runs import BatchRun
from feature_pipeline.settings import Settings

BATCH_TAG = "feature_pipeline/batch_id"
ATTEMPT_TAG = "feature_pipeline/attempt"  # absent on a batch's first run
CAUSE_KEY = "failure_cause"  # in the metadata of the ingest step's Failure: a `failures.Cause` value
# The default run launcher cannot see a killed run worker; run monitoring fails runs past this tag.
MAX_RUNTIME_TAG = "dagster/max_runtime"
FAILURE_TEXT_LIMIT = 300


class DagsterRuns:
    """`RunLookup` over a Dagster instance: the runs of one pipeline's ingest job."""

    def __init__(self, instance: dg.DagsterInstance, job_name: str = "ingest") -> None:
        self.instance = instance
        self.job_name = job_name

    def run_for(self, batch_id: str) -> BatchRun | None:
        filters = dg.RunsFilter(job_name=self.job_name, tags={BATCH_TAG: batch_id})
        records = self.instance.get_run_records(filters=filters, limit=1)
        if not records:
            return None
        record = records[0]
        run = record.dagster_run
        return BatchRun(run.run_id, run.status.value, int(run.tags.get(ATTEMPT_TAG, 0)), record.end_time)

    def failure(self, run: BatchRun) -> RunFailure:
        """The asset's own error and the cause it gave; a run that ended without one (canceled, its worker
        killed, failed by run monitoring or its max runtime) failed for reasons outside its messages."""
        if run.status == dg.DagsterRunStatus.CANCELED.value:
            return RunFailure(f"run {run.run_id} was canceled", Cause.INFRASTRUCTURE)
        conn = self.instance.get_records_for_run(
            run.run_id,
            of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE},
            ascending=True,
        )
        for record in conn.records:
            event = record.event_log_entry.dagster_event
            data = event.event_specific_data if event else None
            error = getattr(data, "error", None)
            if error is not None:
                while error.cause is not None:  # Dagster wraps the asset's own exception; show that one
                    error = error.cause
                text = f"run {run.run_id} failed: {' '.join(error.message.split())[:FAILURE_TEXT_LIMIT]}"
                return RunFailure(text, _cause(data))
        return RunFailure(f"run {run.run_id} failed", Cause.INFRASTRUCTURE)


def _cause(data: object) -> Cause:
    user_data = getattr(data, "user_failure_data", None)
    entry = (user_data.metadata or {}).get(CAUSE_KEY) if user_data is not None else None
    value = getattr(entry, "value", None)
    return Cause.MESSAGES if value == Cause.MESSAGES.value else Cause.INFRASTRUCTURE


def batch_tags(batch_id: str, run_timeout_seconds: int, attempt: int = 0) -> dict[str, str]:
    """The tags of the run that stores a batch."""
    tags = {BATCH_TAG: batch_id, MAX_RUNTIME_TAG: str(run_timeout_seconds)}
    return {**tags, ATTEMPT_TAG: str(attempt)} if attempt else tags


def run_key(batch_id: str, attempt: int = 0) -> str:
    """One run per batch and attempt: the orchestrator never starts two for the same key."""
    return f"{batch_id}.retry-{attempt}" if attempt else batch_id


def per_shard(settings: Settings, run_key: str | None = None, **fields: Any) -> list[dg.RunRequest]:
    """One run request per shard, each sent to its shard's store (and worker) by its tags: what a schedule of a
    job that works on stores asks for. With one store: the one request it always made."""
    tags = dict(fields.pop("tags", {}))
    return [
        dg.RunRequest(
            run_key=None if run_key is None else f"{run_key}.shard-{k}" if settings.shards > 1 else run_key,
            tags={**tags, **shards.run_tags(settings, k)},
            **fields,
        )
        for k in range(settings.shards)
    ]


def tagged_shard(context: Any, settings: Settings) -> int | None:
    """The shard a run's tag names (None: no tag), or a Failure that says what is wrong with it."""
    raw = context.run.tags.get(shards.SHARD_TAG)
    if raw is None:
        return None
    try:
        shard = int(raw)
        shards.for_shard(settings, shard)
    except ValueError as exc:
        raise dg.Failure(f"run tag {shards.SHARD_TAG}={raw!r}: {exc}") from None
    return shard


def shards_of_run(context: Any, settings: Settings) -> list[int]:
    """The shards a run that works on stores works on: its tag's, else every shard (all on this host)."""
    try:
        return shards.local_shards(settings, tagged_shard(context, settings))
    except shards.LayoutError as exc:
        raise dg.Failure(str(exc)) from None


def per_shard_schedule(
    names: Any, job: dg.JobDefinition, name: str, cron: str, description: str
) -> dg.ScheduleDefinition:
    """A schedule (stopped until switched on) of a job that works on stores: one run per shard, on its worker."""

    @dg.schedule(
        name=name,
        job=job,
        cron_schedule=cron,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        required_resource_keys={names.resource_key},
        description=description,
    )
    def schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
        return per_shard(names.settings(context))

    return schedule
