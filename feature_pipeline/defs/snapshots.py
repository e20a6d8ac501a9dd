"""Daily feature snapshots: every user's features as of each UTC day's end, one partition per day.

A partition is recomputed from the raw tables by the same feature query as the live table, so
a backfill over any range (Dagster UI: Materialize > select partitions) rebuilds those days
exactly and idempotently. Runs sit in the `duckdb` pool with the ingest runs: they queue behind
each other instead of fighting for DuckDB's write lock, so a backfill never fails an ingest run.
"""

import warnings
from datetime import UTC, date, datetime

import dagster as dg

from feature_pipeline.defs.names import AssetJob, Names
from feature_pipeline.settings import Settings
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.features import day_end
from feature_pipeline.store.first_day import default_first_day, read_first_day
from feature_pipeline.streams import EVENT_STREAMS

SNAPSHOTS = "user_feature_snapshots"
PARTITIONS_PER_RUN = 7  # a week per backfill run: few run start-ups, ingest runs get the pool in between


def snapshot_start(settings: Settings) -> str:
    """FEATURE_PIPELINE_SNAPSHOT_START, else the store's recorded first day, else yesterday (no store yet)."""
    recorded = read_first_day(settings.feature_store_path)
    return settings.snapshot_start or recorded or default_first_day().isoformat()


def build_snapshots(names: Names, start_date: str) -> tuple[dg.AssetsDefinition, AssetJob, AssetJob]:
    """The partitioned asset (its first day from FEATURE_PIPELINE_SNAPSHOT_START), its job and daily schedule."""
    partitions = dg.DailyPartitionsDefinition(start_date=start_date, timezone="UTC")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # backfill_policy is beta; multi_run is what we need
        asset = _snapshot_asset(names, partitions)
    job = dg.define_asset_job(
        names.of("snapshot_job"),
        selection=[asset],
        executor_def=dg.in_process_executor,
        description="Materializes user_feature_snapshots partitions (the daily schedule runs yesterday).",
    )
    schedule = dg.build_schedule_from_partitioned_job(
        job,
        name=names.of("snapshot_job_schedule"),
        hour_of_day=0,
        minute_of_hour=15,  # yesterday, once the events of its last minutes have had time to arrive
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    return asset, job, schedule


def _snapshot_asset(names: Names, partitions: dg.DailyPartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=names.table(SNAPSHOTS),
        partitions_def=partitions,
        deps=[names.table(s.table) for s in EVENT_STREAMS],
        pool=names.pool,
        required_resource_keys={names.resource_key},
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=PARTITIONS_PER_RUN),
        group_name=names.of("feature_store"),
        kinds={"duckdb"},
        description="user_features of every user as of the end of each UTC day (events with occurred_at "
        "<= 23:59:59.999999), recomputed from the raw tables. Backfill a range to (re)build those days.",
    )
    def user_feature_snapshots(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        store = FeatureStore.from_settings(names.settings(context))
        rows: dict[str, int] = {}
        today = datetime.now(UTC).date()
        for key in context.partition_keys:
            day = date.fromisoformat(key)
            rows[key] = store.snapshot(day)
            note = " (the day is not over: later events of it are not in this snapshot)" if day >= today else ""
            context.log.info(f"snapshot {key}: {rows[key]} users as of {day_end(day).isoformat()}{note}")
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
