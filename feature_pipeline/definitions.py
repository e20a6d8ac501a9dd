"""The code location: assembles the asset graph, job, sensor and resources; nothing else."""

import dagster as dg

from feature_pipeline import settings
from feature_pipeline.defs.assets import STREAM_ASSETS, ingest_batch, ingest_job
from feature_pipeline.defs.resources import build_resources
from feature_pipeline.defs.sensors import build_ingest_sensor

# Fails the code location load with every bad variable named, before anything runs.
SETTINGS = settings.load()

defs = dg.Definitions(
    assets=[*STREAM_ASSETS, ingest_batch],
    jobs=[ingest_job],
    sensors=[build_ingest_sensor(SETTINGS.sensor_interval_seconds)],
    resources=build_resources(),
)
