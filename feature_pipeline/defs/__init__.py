"""Dagster definitions, one module per concern; `feature_pipeline.definitions` assembles them."""
