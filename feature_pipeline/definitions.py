"""The code location: assembles the asset graph, jobs, sensors, schedules and resources; nothing else."""

import dagster as dg

from feature_pipeline import settings
from feature_pipeline.defs.archive import archive_job, archive_schedule
from feature_pipeline.defs.assets import ingest_batch, ingest_job, with_freshness
from feature_pipeline.defs.checks import (
    ingest_check_on_demand,
    runs_check_on_demand,
    stream_checks_job,
    stream_checks_on_demand,
)
from feature_pipeline.defs.redrive import redrive_job
from feature_pipeline.defs.replay import replay_stream
from feature_pipeline.defs.resources import build_resources
from feature_pipeline.defs.retention import prune_ingest_runs, prune_ingest_runs_job
from feature_pipeline.defs.schedules import refresh_feature_windows
from feature_pipeline.defs.sensors import build_ingest_sensor, stream_monitor
from feature_pipeline.defs.snapshots import build_snapshot_asset, snapshot_job, snapshot_schedule
from feature_pipeline.defs.streams import STREAM_ASSETS

# Fails the code location load with every bad variable named, before anything runs.
SETTINGS = settings.load()
snapshots = build_snapshot_asset(SETTINGS.snapshot_start)

defs = dg.Definitions(
    assets=[
        *STREAM_ASSETS,
        with_freshness(ingest_batch, SETTINGS.freshness_warn_seconds, SETTINGS.freshness_fail_seconds),
        snapshots,
    ],
    asset_checks=[stream_checks_on_demand, runs_check_on_demand, ingest_check_on_demand],
    jobs=[ingest_job, snapshot_job, replay_stream, redrive_job, prune_ingest_runs_job, archive_job, stream_checks_job],
    sensors=[build_ingest_sensor(SETTINGS.sensor_interval_seconds), stream_monitor],
    schedules=[refresh_feature_windows, snapshot_schedule, prune_ingest_runs, archive_schedule],
    resources=build_resources(),
    # Backfills and UI launches too: one process per run (the multiprocess executor adds seconds per run).
    executor=dg.in_process_executor,
)
