"""The JetStream streams as external assets: upstream of the raw tables, observed by the sensors."""

import dagster as dg

from feature_pipeline.streams import STREAMS, StreamSpec


def stream_key(spec: StreamSpec) -> dg.AssetKey:
    return dg.AssetKey(["nats", spec.key])


STREAM_ASSETS = [
    dg.AssetSpec(
        stream_key(spec),
        description=f"JetStream stream {spec.name} ({spec.subject}). Observed every sensor tick: consumer lag, "
        "last message time, messages in flight.",
        group_name="streams",
        kinds={"nats"},
    )
    for spec in STREAMS
]
