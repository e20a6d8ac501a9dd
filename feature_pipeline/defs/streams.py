"""The JetStream streams as external assets: upstream of the raw tables, observed by the sensors."""

import dagster as dg

from feature_pipeline.streams import STREAMS, StreamSpec


def stream_key(spec: StreamSpec) -> dg.AssetKey:
    return dg.AssetKey(["nats", spec.key])


STREAM_ASSETS = [
    dg.AssetSpec(
        stream_key(spec),
        description=f"JetStream stream {spec.name} ({spec.subject}). Observed every stream_monitor tick (40 s): "
        "consumer lag, last message time, messages in flight; ingest_running says whether ingest_sensor drains it.",
        group_name="streams",
        kinds={"nats"},
    )
    for spec in STREAMS
]
