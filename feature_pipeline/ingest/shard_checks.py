"""Every shard's checks in every run: a run stores one shard, but its checks speak for the whole store.

With several shards, a run's store checks (dead letters in the last hour, commit latency, rows against a
recomputation, rows against the online store) would otherwise describe only the shard it stored, and the
UI would show whichever shard ran last: a shard with differing rows would turn red after its own runs and
green after the others'. So each run publishes its shard's figures under `meta.checks.<shard>` in the online
store's bucket (every host reaches it; no run reads another shard's file), reads the other shards' latest,
and grades the combination. Figures of a shard whose last run is older than what they count (an hour of
dead letters, RECENT_MINUTES of batches) count as none.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from feature_pipeline.broker import kv
from feature_pipeline.broker.client import REQUEST_TIMEOUT_SECONDS, Broker
from feature_pipeline.ingest.online import SyncResult
from feature_pipeline.settings import Settings
from feature_pipeline.store.feature_store import RECENT_MINUTES, StoreHealth


def share(
    settings: Settings, shard: int, health: StoreHealth, synced: SyncResult
) -> tuple[StoreHealth, SyncResult, str | None]:
    """This shard's figures published, every shard's combined; and what went wrong reading the others (then
    the checks grade this shard alone, and say so)."""
    if settings.shards <= 1:
        return health, synced, None
    try:
        others = asyncio.run(_exchange(settings, shard, figures(health, synced)))
    except Exception as exc:  # NATS answered the run's own write a moment ago: rare, and the next run tries again
        return health, synced, f"could not read the other shards' checks: {type(exc).__name__}: {exc}"
    now = datetime.now(UTC)
    healths = [health, *(_health(o, now) for o in others)]
    syncs = [synced, *(_synced(o, synced.bucket) for o in others)]
    return StoreHealth.combine(healths), SyncResult.combine(syncs), None


def checks_key(shard: int) -> str:
    return f"meta.checks.{shard}"


def figures(health: StoreHealth, synced: SyncResult) -> dict[str, Any]:
    return {
        "at": datetime.now(UTC).isoformat(),
        "dead_letters_last_hour": health.dead_letters_last_hour,
        "dead_letter_reasons": health.dead_letter_reasons,
        "latest_dead_letters": health.latest_dead_letters,
        "consistency_checked": health.consistency_checked,
        "inconsistent_users": health.inconsistent_users,
        "consistency_checked_at": _iso(health.consistency_checked_at),
        "recent_batches": health.recent_batches,
        "recent_worst_p95_seconds": health.recent_worst_p95_seconds,
        "online_compared": synced.compared,
        "online_different": list(synced.different),
        "online_compared_at": _iso(synced.compared_at),
    }


async def published(broker: Broker, settings: Settings) -> dict[int, dict[str, Any]]:
    """Every shard's latest figures, by shard (for `health`, too)."""
    bucket = kv.bucket_for(settings.durable_prefix)
    out = {}
    for shard in range(settings.shards):
        raw = await kv.get_one(broker.nc, bucket, checks_key(shard), REQUEST_TIMEOUT_SECONDS)
        if raw is not None:
            out[shard] = dict(json.loads(raw))
    return out


async def _exchange(settings: Settings, shard: int, mine: dict[str, Any]) -> list[dict[str, Any]]:
    bucket = kv.bucket_for(settings.durable_prefix)
    async with await Broker.connect(settings.nats_url, "feature-pipeline-checks", settings.nats_auth) as broker:
        await kv.put_meta(broker, bucket, checks_key(shard), mine)
        found = await published(broker, settings)
    return [f for k, f in found.items() if k != shard]


def _health(f: dict[str, Any], now: datetime) -> StoreHealth:
    age = now - datetime.fromisoformat(f["at"])
    recent = age <= timedelta(minutes=RECENT_MINUTES)
    return StoreHealth(
        dead_letters_last_hour=f["dead_letters_last_hour"] if age <= timedelta(hours=1) else 0,
        dead_letter_reasons=[(r, n) for r, n in f["dead_letter_reasons"]],
        latest_dead_letters=[(a, s, q, r) for a, s, q, r in f["latest_dead_letters"]],
        consistency_checked=f["consistency_checked"],
        inconsistent_users=list(f["inconsistent_users"]),
        consistency_checked_at=_time(f["consistency_checked_at"]),
        recent_batches=f["recent_batches"] if recent else 0,
        recent_worst_p95_seconds=f["recent_worst_p95_seconds"] if recent else None,
    )


def _synced(f: dict[str, Any], bucket: str) -> SyncResult:
    return SyncResult(
        bucket=bucket,
        written=0,
        deleted=0,
        seconds=0.0,
        valid_as_of=None,
        everything=False,
        compared=f["online_compared"],
        different=tuple(f["online_different"]),
        compared_at=_time(f["online_compared_at"]),
    )


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
