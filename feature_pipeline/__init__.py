"""feature-pipeline: NATS JetStream events into a DuckDB feature store, orchestrated by Dagster."""
