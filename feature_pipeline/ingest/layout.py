"""The number of shards the pipeline runs with, recorded beside its data, and a different number refused.

Changing FEATURE_PIPELINE_SHARDS moves users between stores, so the layout in use is recorded in the online
store's bucket (`meta.layout`, which every host reaches) on the sensor's first tick, and every later tick
compares the configured number with it. A different number stops ingestion in words that name the variable
(the tick's problem, `health`, `up`) until it is set back or `feature-pipeline reshard` has moved the users
and recorded the new layout. Each store file keeps its own record too (`store.layout`), for runs on hosts
that read no bucket before they write.
"""

from __future__ import annotations

import json
from typing import Any

from nats.errors import NoRespondersError

from feature_pipeline import shards
from feature_pipeline.broker import kv
from feature_pipeline.broker.client import REQUEST_TIMEOUT_SECONDS, Broker
from feature_pipeline.settings import Settings


def wanted(n: int) -> dict[str, Any]:
    return {"shards": n, "hash": shards.HASH}


async def recorded(broker: Broker, settings: Settings) -> dict[str, Any] | None:
    """The layout recorded for this pipeline, or None before the first tick recorded one (no bucket yet, or an
    emptied one)."""
    bucket = kv.bucket_for(settings.durable_prefix)
    try:
        raw = await kv.get_one(broker.nc, bucket, kv.LAYOUT_KEY, REQUEST_TIMEOUT_SECONDS)
    except NoRespondersError:  # no such bucket (its stream answers direct gets)
        return None
    return None if raw is None else dict(json.loads(raw))


async def check(broker: Broker, settings: Settings) -> str | None:
    """Why ingestion must hold (the configured number of shards is not the recorded one), or None. Records the
    layout when none is recorded yet."""
    found = await recorded(broker, settings)
    if found is None:
        bucket = kv.bucket_for(settings.durable_prefix)
        await kv.ensure_bucket(broker, bucket, settings.nats_replicas)
        await kv.put_meta(broker, bucket, kv.LAYOUT_KEY, wanted(settings.shards))
        return None
    return refused(found, settings)


def refused(found: dict[str, Any], settings: Settings) -> str | None:
    if found == wanted(settings.shards):
        return None
    where = f"recorded in {kv.bucket_for(settings.durable_prefix)} {kv.LAYOUT_KEY}"
    if found.get("hash") != shards.HASH:
        return (
            f"the feature store's users were split by {found.get('hash')!r}, which this version does not know ({where})"
        )
    return shards.refusal(settings.shards, int(found.get("shards", 1)), where)


async def record(broker: Broker, settings: Settings, n: int) -> None:
    """After a reshard: the stores now hold `n` shards."""
    bucket = kv.bucket_for(settings.durable_prefix)
    await kv.ensure_bucket(broker, bucket, settings.nats_replicas)
    await kv.put_meta(broker, bucket, kv.LAYOUT_KEY, wanted(n))
