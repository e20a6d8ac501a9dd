"""The archive job and its schedule (stopped by default): raw events past the horizon go to Parquet.

The job holds the `duckdb` pool like the ingest runs, so it never waits on a batch's transaction nor
makes one wait long; see `feature_pipeline.store.archive` for why an interrupted run loses nothing.
"""

from datetime import timedelta

import dagster as dg

from feature_pipeline import shards
from feature_pipeline.defs.names import Names, one_op_job
from feature_pipeline.defs.runs import per_shard_schedule, shards_of_run
from feature_pipeline.store.feature_store import FeatureStore


def build_archive(names: Names) -> tuple[dg.JobDefinition, dg.ScheduleDefinition]:
    """The archive job and its daily schedule."""

    @dg.op(
        name=names.of("archive"),
        pool=names.pool,
        required_resource_keys={names.resource_key},
        description="Archive raw events older than FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS.",
    )
    def archive_op(context: dg.OpExecutionContext) -> None:
        cfg = names.settings(context)
        for shard in shards_of_run(context, cfg):
            store = FeatureStore.from_settings(cfg, shard)
            result = store.archive(shards.for_shard(cfg, shard).archive_path, timedelta(days=cfg.archive_after_days))
            context.log.info(result.summary() + (f" ({store.name})" if cfg.shards > 1 else ""))

    archive_job = one_op_job(
        names,
        archive_op,
        "archive",
        "archive_raw_events",
        "Moves raw events older than FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS to day-partitioned Parquet under "
        "FEATURE_PIPELINE_ARCHIVE_PATH; snapshots, backfills, training sets and checks keep reading them.",
    )

    schedule = per_shard_schedule(
        names,
        archive_job,
        names.of("archive_raw_events_daily"),
        "45 3 * * *",
        "Every day at 03:45 UTC, once switched on: archive raw events past the horizon.",
    )
    return archive_job, schedule
