"""One pipeline instance's definitions: every asset, check, job, sensor and schedule under its names."""

import dagster as dg

from feature_pipeline.defs.archive import build_archive
from feature_pipeline.defs.assets import Ingest, with_freshness
from feature_pipeline.defs.checks import Checks
from feature_pipeline.defs.export import build_export
from feature_pipeline.defs.names import Names
from feature_pipeline.defs.redrive import build_redrive
from feature_pipeline.defs.replay import build_replay
from feature_pipeline.defs.resources import PipelineResource
from feature_pipeline.defs.retention import build_retention
from feature_pipeline.defs.schedules import build_refresh_schedule
from feature_pipeline.defs.sensors import build_ingest_sensor, build_stream_monitor
from feature_pipeline.defs.snapshots import build_snapshots
from feature_pipeline.defs.streams import stream_assets
from feature_pipeline.settings import Settings


def build_definitions(names: Names, resource: PipelineResource, settings: Settings) -> dg.Definitions:
    """`settings` are the values as this process reads them: what shapes the definitions themselves
    (freshness windows, sensor interval); runs read theirs from `resource`."""
    checks = Checks(names)
    ingest = Ingest(names, checks, settings.shards)
    ingest_asset = ingest.asset()
    ingest_job = ingest.job(ingest_asset)
    snapshots, snapshot_job, snapshot_schedule = build_snapshots(names)
    archive_job, archive_schedule = build_archive(names)
    prune_job, prune_schedule = build_retention(names)
    export_job, export_schedule = build_export(names)
    return dg.Definitions(
        assets=[
            *stream_assets(names, settings.monitor_interval_seconds),
            with_freshness(
                ingest_asset, names.user_features, settings.freshness_warn_seconds, settings.freshness_fail_seconds
            ),
            snapshots,
        ],
        asset_checks=checks.on_demand(),
        jobs=[
            ingest_job,
            snapshot_job,
            build_replay(names),
            build_redrive(names),
            prune_job,
            archive_job,
            export_job,
            checks.job(),
        ],
        sensors=[
            build_ingest_sensor(names, ingest_job, checks, settings.sensor_interval_seconds),
            build_stream_monitor(names, checks, settings.monitor_interval_seconds),
        ],
        schedules=[
            build_refresh_schedule(names, ingest_job, settings.shards),
            snapshot_schedule,
            prune_schedule,
            archive_schedule,
            export_schedule,
        ],
        resources={names.resource_key: resource},
    )
