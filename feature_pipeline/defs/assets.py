"""The asset graph: the NATS streams (external, observed by the sensor) feed the DuckDB tables.

One multi-asset writes all four tables of a batch in one DuckDB transaction; it sits
in the `duckdb` pool, limited to one at a time in dagster.yaml, so two runs never
fight over the file's write lock.
"""

from collections.abc import Iterator

import dagster as dg

from feature_pipeline.broker import DEADLETTER, FEEDBACK, SIGNALS, STREAMS, StreamSpec
from feature_pipeline.defs.resources import FeatureStoreResource, IngestResource

BATCH_TAG = "feature_pipeline/batch_id"
DUCKDB_POOL = "duckdb"
LOGGED_IDS = 20


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

RAW_SPECS = {
    "signal_events": dg.AssetSpec(
        "signal_events",
        deps=[stream_key(SIGNALS)],
        description="One row per signal event id: subject, stream sequence, occurred_at, received_at, user_id, "
        "type, payload.",
        group_name="feature_store",
        kinds={"duckdb"},
    ),
    "feedback_events": dg.AssetSpec(
        "feedback_events",
        deps=[stream_key(FEEDBACK)],
        description="One row per recommendation-feedback event id.",
        group_name="feature_store",
        kinds={"duckdb"},
    ),
    "dead_letters": dg.AssetSpec(
        "dead_letters",
        deps=[stream_key(DEADLETTER)],
        description="Messages that could not be stored, with the reason: poison input or too many failed runs.",
        group_name="feature_store",
        kinds={"duckdb"},
    ),
    "user_features": dg.AssetSpec(
        "user_features",
        deps=["signal_events", "feedback_events"],
        description="One row per user, recomputed from the raw tables as of updated_at.",
        group_name="feature_store",
        kinds={"duckdb"},
    ),
}


@dg.multi_asset(specs=list(RAW_SPECS.values()), pool=DUCKDB_POOL, can_subset=False, name="ingest_batch")
def ingest_batch(
    context: dg.AssetExecutionContext, feature_store: FeatureStoreResource, ingest: IngestResource
) -> Iterator[dg.MaterializeResult]:
    """Store the staged batch named by the run's batch tag; without one, rebuild user_features."""
    store = feature_store.store
    batch_id = context.run.tags.get(BATCH_TAG)
    if batch_id is None:
        rows = store.recompute_all()
        context.log.info(f"no batch tag on this run: rebuilt all {rows} user_features rows from the raw tables")
        for key in RAW_SPECS:
            yield dg.MaterializeResult(
                asset_key=key, metadata={"recomputed": key == "user_features", "user_features_rows": rows}
            )
        return

    batch_dir = ingest.staging.path(batch_id)
    if not (batch_dir / "manifest.json").is_file():
        raise dg.Failure(
            f"staged batch {batch_id} is not in {ingest.staging.root}: it was already settled (acked or "
            "redelivered) by the sensor, so re-executing this run has nothing to store"
        )
    result = store.apply_batch(batch_dir, batch_id, fail_before_commit=feature_store.fault("fail-run"))
    shown = ", ".join(result.event_ids[:LOGGED_IDS])
    more = len(result.event_ids) - LOGGED_IDS
    context.log.info(
        f"stored batch {batch_id}: {result.events_in_batch} events ({result.signals_inserted} new signals, "
        f"{result.feedback_inserted} new feedback, {result.duplicates_absorbed} duplicates absorbed), "
        f"{result.dead_letters_inserted} dead letters, {result.users_touched} users refreshed; "
        f"events: {shown}{f' and {more} more' if more > 0 else ''}"
    )
    meta = result.as_metadata()
    per_asset = {
        "signal_events": {"events_stored": result.signals_inserted, "rows_total": result.signal_events_rows},
        "feedback_events": {
            "events_stored": result.feedback_inserted,
            "rows_total": result.feedback_events_rows,
        },
        "dead_letters": {"dead_letters_stored": result.dead_letters_inserted},
        "user_features": {"users_touched": result.users_touched, "rows_total": result.user_features_rows},
    }
    for key, extra in per_asset.items():
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "batch_id": batch_id,
                "duplicates_absorbed": meta["duplicates_absorbed"],
                "events_in_batch": meta["events_in_batch"],
                **extra,
            },
        )


ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets(ingest_batch),
    # One process per run: the default multiprocess executor adds ~4 s per micro-batch.
    executor_def=dg.in_process_executor,
    description="Stores one staged micro-batch; launched by ingest_sensor, which settles it afterwards.",
)
