"""Daily feature snapshots: every user's features as of each UTC day's end, one partition per day.

The days offered are the ones the store's history reaches, kept current as it grows (see
`feature_pipeline.snapshot_days`).

A partition is recomputed from the raw tables by the same feature query as the live table, so
a backfill over any range (Dagster UI: Materialize > select partitions) rebuilds those days
exactly and idempotently. Runs sit in the `duckdb` pool with the ingest runs: they queue behind
each other instead of fighting for DuckDB's write lock, so a backfill never fails an ingest run.
"""

import warnings
from datetime import UTC, date, datetime

import dagster as dg

from feature_pipeline.defs.names import AssetJob, Names
from feature_pipeline.defs.runs import per_shard, shards_of_run
from feature_pipeline.settings import Settings
from feature_pipeline.snapshot_days import available, refusal, register, yesterday
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.features import day_end

SNAPSHOTS = "user_feature_snapshots"
PARTITIONS_PER_RUN = 7  # a week per backfill run: few run start-ups, ingest runs get the pool in between


def partitions_name(names: Names) -> str:
    """The dynamic partitions of the snapshot days (see `feature_pipeline.snapshot_days` for why dynamic)."""
    return names.of("snapshot_days")


def keep_days_current(instance: dg.DagsterInstance, names: Names, settings: Settings) -> str | None:
    """Add the snapshot days the stored history reaches that Dagster does not list yet; a line saying which,
    or None. Called by every ingest run (older events just stored) and stream_monitor tick (a day is over)."""
    added = register(instance, partitions_name(names), available(settings))
    if not added:
        return None
    span = added[0] if len(added) == 1 else f"{added[0]}..{added[-1]}"
    return f"{len(added)} snapshot day(s) can now be snapshotted and backfilled: {span}"


def build_snapshots(names: Names) -> tuple[dg.AssetsDefinition, AssetJob, dg.ScheduleDefinition]:
    """The partitioned asset (one dynamic partition per day the store's history reaches), its job and daily
    schedule."""
    partitions = dg.DynamicPartitionsDefinition(name=partitions_name(names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # backfill_policy is beta; multi_run is what we need
        asset = _snapshot_asset(names, partitions)
    job = dg.define_asset_job(
        names.of("snapshot_job"),
        selection=[asset],
        executor_def=dg.in_process_executor,
        description="Materializes user_feature_snapshots partitions (the daily schedule runs yesterday).",
    )
    return asset, job, _schedule(names, job)


def _schedule(names: Names, job: AssetJob) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=names.of("snapshot_job_schedule"),
        job=job,
        cron_schedule="15 0 * * *",  # yesterday, once the events of its last minutes have had time to arrive
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        required_resource_keys={names.resource_key},
        description="Snapshots yesterday at 00:15 UTC, once the store holds events of that day or before.",
    )
    def snapshot_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        settings = names.settings(context)
        now = context.scheduled_execution_time or datetime.now(UTC)
        register(context.instance, partitions_name(names), available(settings, now))
        day = yesterday(now).isoformat()
        if day not in available(settings, now):
            return dg.SkipReason(f"no snapshot day yet: no event stored in {settings.feature_store_path}")
        return per_shard(settings, run_key=day, partition_key=day)

    return snapshot_schedule


def _snapshot_asset(names: Names, partitions: dg.DynamicPartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=names.table(SNAPSHOTS),
        partitions_def=partitions,
        deps=[names.table(s.table) for s in names.sources],
        pool=names.pool,
        required_resource_keys={names.resource_key},
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=PARTITIONS_PER_RUN),
        group_name=names.of("feature_store"),
        kinds={"duckdb"},
        description="user_features of every user as of the end of each UTC day (events with occurred_at "
        "<= 23:59:59.999999), recomputed from the raw tables. Backfill a range to (re)build those days.",
    )
    def user_feature_snapshots(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        settings = names.settings(context)
        stores = [FeatureStore.from_settings(settings, k) for k in shards_of_run(context, settings)]
        rows: dict[str, int] = {}
        for key in context.partition_keys:  # each a day that is over (see _day)
            day = _day(key, settings)
            rows[key] = sum(store.snapshot(day) for store in stores)
            where = f" in {', '.join(s.name for s in stores)}" if settings.shards > 1 else ""
            context.log.info(f"snapshot {key}: {rows[key]} users as of {day_end(day).isoformat()}{where}")
        return dg.MaterializeResult(
            metadata={
                "users_per_day": dg.MetadataValue.md(
                    "| day | users |\n|---|---|\n" + "\n".join(f"| {k} | {n} |" for k, n in rows.items())
                ),
                "days": len(rows),
                "users_last_day": rows[context.partition_keys[-1]] if rows else 0,
            }
        )

    return user_feature_snapshots


def _day(key: str, settings: Settings) -> date:
    """The partition's day; a key added by hand in the UI ("Add partition") that is not a snapshot day fails
    the run in words rather than with a parse error."""
    try:
        day = date.fromisoformat(key)
    except ValueError:
        raise dg.Failure(f"{key!r} is not a day: snapshot partitions are UTC days, YYYY-MM-DD") from None
    refused = refusal(day, day, settings)
    if refused:
        raise dg.Failure(f"cannot snapshot {key}: {refused}")
    return day
