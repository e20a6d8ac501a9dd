"""The code location: the pipeline's Component, without a prefix, configured by the environment."""

import dagster as dg

from feature_pipeline.component import FeaturePipelineComponent

# Fails the code location load with every bad variable named, before anything runs.
defs = dg.Definitions.merge(
    FeaturePipelineComponent.from_environment().definitions(),
    # Backfills and UI launches too: one process per run (the multiprocess executor adds seconds per run).
    dg.Definitions(executor=dg.in_process_executor),
)
