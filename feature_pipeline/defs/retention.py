"""Run retention: at one run per batch the instance gains thousands of runs a day; old ingest runs go.

A deleted run takes its event log with it, so the materializations and check results it recorded
leave the assets' history too; the latest ones, from recent runs, stay. Runs of other jobs
(snapshots, replay) are kept. Ticks are pruned by Dagster itself (`retention` in dagster.yaml).
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from feature_pipeline.defs.names import Names, one_op_job

FAILED_KEPT_TIMES = 4  # failed and canceled runs are kept this many times as long: they explain dead letters
PAGE = 500


def prune(instance: dg.DagsterInstance, days: int, now: datetime, job_name: str = "ingest") -> dict[str, int]:
    """Delete ingest runs created before their cutoff; returns how many of each kind went."""
    kinds = {
        "succeeded": ([dg.DagsterRunStatus.SUCCESS], now - timedelta(days=days)),
        "failed": (
            [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED],
            now - timedelta(days=days * FAILED_KEPT_TIMES),
        ),
    }
    deleted = dict.fromkeys(kinds, 0)
    for kind, (statuses, cutoff) in kinds.items():
        filters = dg.RunsFilter(job_name=job_name, statuses=statuses, created_before=cutoff)
        while records := instance.get_run_records(filters=filters, limit=PAGE):
            for record in records:
                instance.delete_run(record.dagster_run.run_id)
            deleted[kind] += len(records)
    return deleted


def build_retention(names: Names) -> tuple[dg.JobDefinition, dg.ScheduleDefinition]:
    """The job that deletes old ingest runs and its daily schedule."""

    @dg.op(
        name=names.of("prune_runs"),
        required_resource_keys={names.resource_key},
        description="Delete ingest runs older than FEATURE_PIPELINE_RUN_RETENTION_DAYS (failed ones: 4x as old).",
    )
    def prune_runs(context: dg.OpExecutionContext) -> None:
        days = names.settings(context).run_retention_days
        deleted = prune(context.instance, days, datetime.now(UTC), names.ingest_job)
        context.log.info(
            f"deleted {deleted['succeeded']} succeeded ingest runs older than {days} days and {deleted['failed']} "
            f"failed or canceled ones older than {days * FAILED_KEPT_TIMES} days"
        )

    prune_job = one_op_job(
        names, prune_runs, "prune_runs", "prune_ingest_runs_job", "Deletes old ingest runs (see prune_ingest_runs)."
    )

    schedule = dg.ScheduleDefinition(
        name=names.of("prune_ingest_runs"),
        job=prune_job,
        cron_schedule="30 3 * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every day at 03:30 UTC: delete old ingest runs, so the instance does not grow without bound.",
    )
    return prune_job, schedule
