"""What a run records on the assets it wrote: materialization metadata built from the store's results."""

from typing import Any

import dagster as dg

from feature_pipeline import streams
from feature_pipeline.ingest.online import SyncResult
from feature_pipeline.ingest.staging import Manifest
from feature_pipeline.store.feature_store import BatchResult, Refresh, StoreHealth


def dead_letters(health: StoreHealth) -> dict[str, Any]:
    rows = "\n".join(f"| {n} | {r.replace('|', '/')} |" for r, n in health.dead_letter_reasons)
    latest = "\n".join(
        f"| {at} | {st} #{seq} | {r.replace('|', '/')} |" for at, st, seq, r in health.latest_dead_letters
    )
    return {
        "dead_letters_last_hour": health.dead_letters_last_hour,
        "by_reason": dg.MetadataValue.md(f"| count | reason |\n|---|---|\n{rows}" if rows else "none"),
        "latest": dg.MetadataValue.md(f"| when | message | reason |\n|---|---|---|\n{latest}" if latest else "none"),
    }


def refresh(r: Refresh) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "valid_as_of": dg.MetadataValue.timestamp(r.valid_as_of),
        "rows_recomputed": r.rows_written,
        "rebuilt_all_rows": r.rebuilt,
    }
    if r.schema_changes:
        meta["schema_changes"] = "; ".join(r.schema_changes)
    if r.partials_rebuilt:  # the whole history was read for these sources' all-time features
        meta["partials_rebuilt_from_history"] = ", ".join(r.partials_rebuilt)
    if r.sources_changed:
        meta["sources_changed"] = "; ".join(r.sources_changed)
    return meta


def online(sync: SyncResult) -> dict[str, Any]:
    """What the run wrote to the online store (JetStream KV) after its commit."""
    return {
        "online_bucket": sync.bucket,
        "online_rows_written": sync.written,
        "online_keys_deleted": sync.deleted,
        "online_write_seconds": sync.seconds,
        **({"online_wrote_every_row": True} if sync.everything else {}),
    }


def shard(index: int, shards: int) -> dict[str, Any]:
    """Which shard a record is about (nothing with one store)."""
    return {"shard": index} if shards > 1 else {}


def run_tags(result: BatchResult, manifest: Manifest) -> dict[str, str]:
    """Tags the run list shows: what the batch stored and where it came from."""
    ranges = ", ".join(f"{stream} {lo}-{hi}" for stream, (lo, hi) in sorted(manifest.seq_ranges.items()))
    return {
        "feature_pipeline/events_stored": str(result.inserted),
        "feature_pipeline/dead_letters": str(result.dead_letters_inserted + result.conflicting_duplicates),
        "feature_pipeline/ranges": ranges or "none",
    }


def batch_common(result: BatchResult, manifest: Manifest) -> dict[str, Any]:
    """The batch's summary on user_features: its counts, its sequence ranges and latency."""
    meta: dict[str, Any] = {
        "batch_id": result.batch_id,
        "events_in_batch": result.events_in_batch,
        "duplicates_absorbed": result.duplicates_absorbed,
        "poison_dead_lettered": len(result.poison),
        "checked_by_models": result.intake.checked_by_models,
        "dead_letters_stored": result.dead_letters_inserted,
        "conflicting_duplicates": result.conflicting_duplicates,
        "users_touched": result.users_touched,
        "late_events": result.late_events,
    }
    if result.late_events:
        meta["late_event_days"] = ", ".join(result.late_days)
        meta["max_lateness_seconds"] = round(result.max_lateness_seconds or 0.0, 3)
    for stream, (lo, hi) in manifest.seq_ranges.items():
        meta[f"{stream.lower()}_seq_range"] = f"{lo}-{hi}"
    if result.latency_max_seconds is not None:
        meta["publish_to_commit_p50_seconds"] = round(result.latency_p50_seconds or 0.0, 3)
        meta["publish_to_commit_p95_seconds"] = round(result.latency_p95_seconds or 0.0, 3)
        meta["publish_to_commit_max_seconds"] = round(result.latency_max_seconds, 3)
    return meta


def batch_per_table(result: BatchResult, sources: tuple[streams.StreamSpec, ...]) -> dict[str, dict[str, Any]]:
    """What each table of an ingest run shows; `changed` says whether the batch added rows to it."""
    per: dict[str, dict[str, Any]] = {
        spec.table: {
            "changed": result.new_in(spec.name) > 0,
            "batch_id": result.batch_id,
            "events_stored": result.new_in(spec.name),
            "rows_total": result.rows[spec.table],
        }
        for spec in sources
    }
    recorded = result.dead_letters_inserted + result.conflicting_duplicates
    per[streams.DEADLETTER.table] = {
        "changed": recorded > 0,
        "batch_id": result.batch_id,
        "dead_letters_stored": recorded,
        **dead_letters(result.health),
    }
    per["user_features"] = {"rows_total": result.user_features_rows, **refresh(result.refresh)}
    return per
