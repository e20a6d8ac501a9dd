"""The asset graph: the NATS streams (external, observed by the sensor) feed the DuckDB tables.

One multi-asset writes all four tables of a batch in one DuckDB transaction; it sits
in the `duckdb` pool, limited to one at a time in dagster.yaml, so two runs never
fight over the file's write lock.
"""

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import dagster as dg

from feature_pipeline.broker import DEADLETTER, FEEDBACK, SIGNALS
from feature_pipeline.defs.checks import CONSISTENCY_CHECK, DEAD_LETTERS_CHECK, store_check_results
from feature_pipeline.defs.resources import FeatureStoreResource, IngestResource, MonitoringResource
from feature_pipeline.defs.streams import stream_key
from feature_pipeline.store import FeatureStore, Refresh, StoreHealth

BATCH_TAG = "feature_pipeline/batch_id"
# On a run without a batch: "windows" only moves the clock (the schedule's runs); absent = rebuild every row.
REFRESH_TAG = "feature_pipeline/refresh"
DUCKDB_POOL = "duckdb"
LOGGED_IDS = 20


RAW_SPECS = {
    "signal_events": dg.AssetSpec(
        "signal_events",
        deps=[stream_key(SIGNALS)],
        description="One row per signal event id: subject, stream sequence, occurred_at, received_at, user_id, "
        "type, payload.",
        group_name="feature_store",
        kinds={"duckdb"},
        skippable=True,  # a window-refresh run observes user_features and materializes nothing
    ),
    "feedback_events": dg.AssetSpec(
        "feedback_events",
        deps=[stream_key(FEEDBACK)],
        description="One row per recommendation-feedback event id.",
        group_name="feature_store",
        kinds={"duckdb"},
        skippable=True,  # a window-refresh run observes user_features and materializes nothing
    ),
    "dead_letters": dg.AssetSpec(
        "dead_letters",
        deps=[stream_key(DEADLETTER)],
        description="Messages that could not be stored, with the reason: poison input or too many failed runs.",
        group_name="feature_store",
        kinds={"duckdb"},
        skippable=True,  # a window-refresh run observes user_features and materializes nothing
    ),
    "user_features": dg.AssetSpec(
        "user_features",
        deps=["signal_events", "feedback_events"],
        description="One row per user, every feature of the registry (feature_defs.toml), correct as of the last "
        "run's clock (valid_as_of in the metadata); updated_at is when the row was last recomputed.",
        group_name="feature_store",
        kinds={"duckdb"},
        skippable=True,  # a window-refresh run observes user_features and materializes nothing
    ),
}


def with_freshness(assets_def: dg.AssetsDefinition, warn_seconds: int, fail_seconds: int) -> dg.AssetsDefinition:
    """user_features must be materialized every so often; the freshness daemon grades it."""
    policy = dg.FreshnessPolicy.time_window(
        fail_window=timedelta(seconds=fail_seconds), warn_window=timedelta(seconds=warn_seconds)
    )
    return assets_def.map_asset_specs(
        lambda spec: spec.replace_attributes(freshness_policy=policy) if spec.key.path == ["user_features"] else spec
    )


def _dead_letter_metadata(health: StoreHealth) -> dict[str, Any]:
    rows = "\n".join(f"| {n} | {r.replace('|', '/')} |" for r, n in health.dead_letter_reasons)
    latest = "\n".join(
        f"| {at} | {st} #{seq} | {r.replace('|', '/')} |" for at, st, seq, r in health.latest_dead_letters
    )
    return {
        "dead_letters_last_hour": health.dead_letters_last_hour,
        "by_reason": dg.MetadataValue.md(f"| count | reason |\n|---|---|\n{rows}" if rows else "none"),
        "latest": dg.MetadataValue.md(f"| when | message | reason |\n|---|---|---|\n{latest}" if latest else "none"),
    }


def _refresh_metadata(refresh: Refresh) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "valid_as_of": refresh.valid_as_of.isoformat(),
        "rows_recomputed": refresh.rows_written,
        "rebuilt_all_rows": refresh.rebuilt,
        "serving_copy": "published" if refresh.serving_error is None else f"NOT replaced: {refresh.serving_error}",
    }
    if refresh.schema_changes:
        meta["schema_changes"] = "; ".join(refresh.schema_changes)
    return meta


def _move_clock(
    context: dg.AssetExecutionContext, store: FeatureStore, monitoring: MonitoringResource
) -> Iterator[dg.AssetCheckResult]:
    """The window refresh: rows change as time passes, but no data arrived, so user_features gets an
    observation, not a materialization: its freshness keeps telling whether ingest is alive."""
    refresh, health = store.advance(consistency_sample=monitoring.consistency_sample)
    _log_refresh(context, refresh)
    context.log.info(
        f"moved the clock to {refresh.valid_as_of.isoformat()}: {refresh.rows_written} rows whose windows moved "
        "were recomputed"
    )
    context.log_event(dg.AssetObservation(asset_key="user_features", metadata=_refresh_metadata(refresh)))
    yield from store_check_results(health, monitoring)


def _log_refresh(context: dg.AssetExecutionContext, refresh: Refresh) -> None:
    if refresh.schema_changes:
        context.log.info(
            "feature definitions changed (" + "; ".join(refresh.schema_changes) + "): rebuilt every row"
        )
    if refresh.serving_error:
        context.log.warning(refresh.serving_error + " (the previous copy stays; the batch is stored)")


@dg.multi_asset(
    specs=list(RAW_SPECS.values()),
    check_specs=[DEAD_LETTERS_CHECK, CONSISTENCY_CHECK],
    pool=DUCKDB_POOL,
    can_subset=False,
    name="ingest_batch",
)
def ingest_batch(
    context: dg.AssetExecutionContext,
    feature_store: FeatureStoreResource,
    ingest: IngestResource,
    monitoring: MonitoringResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Store the staged batch named by the run's batch tag. Without one: move the window clock (tag
    feature_pipeline/refresh=windows, the schedule's runs) or, launched by hand, rebuild user_features."""
    store = feature_store.store
    batch_id = context.run.tags.get(BATCH_TAG)
    if batch_id is None:
        if context.run.tags.get(REFRESH_TAG) == "windows":
            yield from _move_clock(context, store, monitoring)
            return
        refresh, health = store.recompute_all(monitoring.consistency_sample)
        _log_refresh(context, refresh)
        context.log.info(
            f"rebuilt user_features as of {refresh.valid_as_of.isoformat()}: {refresh.rows_written} rows "
            "recomputed from the raw tables"
        )
        for key in RAW_SPECS:
            meta: dict[str, Any] = {"refresh": "rebuild"}
            if key == "user_features":
                meta.update(_refresh_metadata(refresh))
            if key == "dead_letters":
                meta.update(_dead_letter_metadata(health))
            yield dg.MaterializeResult(asset_key=key, metadata=meta)
        yield from store_check_results(health, monitoring)
        return

    batch_dir = ingest.staging.path(batch_id)
    if not (batch_dir / "manifest.json").is_file():
        raise dg.Failure(
            f"staged batch {batch_id} is not in {ingest.staging.root}: it was already settled (acked or "
            "redelivered) by the sensor, so re-executing this run has nothing to store"
        )
    manifest = json.loads((batch_dir / "manifest.json").read_text())
    result = store.apply_batch(
        batch_dir,
        batch_id,
        faults=ingest.fault_set,
        consistency_sample=monitoring.consistency_sample,
    )
    shown = ", ".join(result.event_ids[:LOGGED_IDS])
    more = len(result.event_ids) - LOGGED_IDS
    _log_refresh(context, result.refresh)
    if result.late_events:
        context.log.warning(
            f"{result.late_events} event(s) arrived more than {feature_store.allowed_lateness_seconds} s after they "
            f"occurred (up to {result.max_lateness_seconds:.0f} s), on {', '.join(result.late_days)}: stored and "
            "counted; snapshots of those days taken before now miss them until backfilled"
        )
    context.log.info(
        f"stored batch {batch_id}: {result.events_in_batch} events ({result.signals_inserted} new signals, "
        f"{result.feedback_inserted} new feedback, {result.duplicates_absorbed} duplicates absorbed), "
        f"{result.dead_letters_inserted} dead letters, {result.conflicting_duplicates} conflicting duplicates, "
        f"{result.users_touched} users refreshed; "
        f"events: {shown}{f' and {more} more' if more > 0 else ''}"
    )
    common: dict[str, Any] = {
        "batch_id": batch_id,
        "events_in_batch": result.events_in_batch,
        "duplicates_absorbed": result.duplicates_absorbed,
        "dead_letters_stored": result.dead_letters_inserted,
        "conflicting_duplicates": result.conflicting_duplicates,
        "users_touched": result.users_touched,
        "late_events": result.late_events,
    }
    if result.late_events:
        common["late_event_days"] = ", ".join(result.late_days)
        common["max_lateness_seconds"] = round(result.max_lateness_seconds or 0.0, 3)
    for stream, (lo, hi) in manifest["seq_ranges"].items():
        common[f"{stream.lower()}_seq_range"] = f"{lo}-{hi}"
    if result.latency_max_seconds is not None:
        common["publish_to_commit_p50_seconds"] = round(result.latency_p50_seconds or 0.0, 3)
        common["publish_to_commit_p95_seconds"] = round(result.latency_p95_seconds or 0.0, 3)
        common["publish_to_commit_max_seconds"] = round(result.latency_max_seconds, 3)
    per_asset: dict[str, dict[str, Any]] = {
        "signal_events": {"events_stored": result.signals_inserted, "rows_total": result.signal_events_rows},
        "feedback_events": {"events_stored": result.feedback_inserted, "rows_total": result.feedback_events_rows},
        "dead_letters": _dead_letter_metadata(result.health),
        "user_features": {"rows_total": result.user_features_rows, **_refresh_metadata(result.refresh)},
    }
    for key, extra in per_asset.items():
        yield dg.MaterializeResult(asset_key=key, metadata={**common, **extra})
    yield from store_check_results(result.health, monitoring)


ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets(ingest_batch),
    # One process per run: the default multiprocess executor adds ~4 s per micro-batch.
    executor_def=dg.in_process_executor,
    description="Stores one staged micro-batch; launched by ingest_sensor, which settles it afterwards.",
)
