"""The JetStream streams as external assets: upstream of the raw tables, observed by the sensors."""

import dagster as dg

from feature_pipeline.defs.names import Names


def stream_assets(names: Names, monitor_seconds: int) -> list[dg.AssetSpec]:
    monitor = names.of("stream_monitor")
    return [
        dg.AssetSpec(
            names.stream(spec),
            description=f"JetStream stream {spec.name} ({', '.join(spec.subjects)}). Observed every {monitor} tick "
            f"({monitor_seconds} s): consumer lag, last message time, messages in flight; ingest_running says "
            f"whether {names.ingest_sensor} drains it.",
            group_name=names.of("streams"),
            kinds={"nats"},
        )
        for spec in names.streams
    ]
