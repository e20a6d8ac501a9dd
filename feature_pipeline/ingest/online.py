"""Keeping the online store (JetStream KV) equal to user_features: every run that changes rows writes them
after its DuckDB commit and before it reports success.

What to write is durable: the refresh records the changed users in the store's `online_pending` table in
the same transaction as the rows (see `store.online`). `sync` writes those users' current rows and then
empties the table, holding the store's write lock throughout, so no other writer changes a row in
between. A failed write raises `OnlineStoreError`: for the run it is an infrastructure failure, so the
batch stays staged, no delivery is spent, and the retry (whose apply absorbs every event already
stored) finds the same users pending and writes them again.

Order: one writer at a time (the lock), each value read from the latest commit, and one key's writes
stored in the order they are sent; so every key's successive values in the KV follow the store's
commits, and a reader of the stream's leader (or of a watch) never sees a row older than one it has
already seen. See `read.online` for readers of other replicas.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import orjson

from feature_pipeline.broker import kv
from feature_pipeline.broker.client import REQUEST_TIMEOUT_SECONDS, Broker
from feature_pipeline.settings import Settings
from feature_pipeline.store import online
from feature_pipeline.store.feature_store import FeatureStore


@dataclass(frozen=True)
class SyncResult:
    bucket: str
    written: int  # rows written to the KV
    deleted: int  # keys deleted (users who no longer have a row)
    seconds: float
    valid_as_of: datetime | None
    everything: bool  # every row was written: a new or emptied bucket, or a store older than the KV
    compared: int = 0  # rows sampled from user_features and read back from the KV
    different: tuple[str, ...] = ()  # users among them whose KV row is not their row in the store


COMPARE_AT_MOST = 1000  # rows a sync reads back: one batched get


def sync(settings: Settings, store: FeatureStore, *, compare: int = 0, wait_seconds: float = 120.0) -> SyncResult:
    """Write every pending row to the bucket, then read back `compare` random rows (at most COMPARE_AT_MOST)
    and compare them with the store; raises OnlineStoreError (or BrokerUnavailable) when it cannot write."""
    started = time.monotonic()
    con = store.connect(wait_seconds=wait_seconds)  # the write lock, until the pending users are cleared
    try:
        job = _Sync(settings, store, con)
        written, deleted, as_of, everything, different = asyncio.run(job.run(min(compare, COMPARE_AT_MOST)))
    finally:
        con.close()
    seconds = round(time.monotonic() - started, 3)
    return SyncResult(job.bucket, written, deleted, seconds, as_of, everything, *different)


class _Sync:
    def __init__(self, settings: Settings, store: FeatureStore, con: duckdb.DuckDBPyConnection) -> None:
        self.settings, self.store, self.con = settings, store, con
        self.bucket = kv.bucket_for(settings.durable_prefix)

    async def run(self, compare: int) -> tuple[int, int, datetime | None, bool, tuple[int, tuple[str, ...]]]:
        s = self.settings
        async with await Broker.connect(s.nats_url, "feature-pipeline-online", s.nats_auth) as broker:
            await kv.ensure_bucket(broker, self.bucket, s.nats_replicas)
            # No state: the bucket is new, was emptied, or this store predates it; every row goes in.
            everything = await kv.get_state(broker.nc, self.bucket, REQUEST_TIMEOUT_SECONDS) is None
            if everything:
                online.mark_everyone(self.con)
            as_of = self._valid_as_of()
            written = deleted = 0
            for chunk in online.pending_values(self.con, self.store.registry, as_of or datetime.now(UTC)):
                written += await kv.put_many(broker, self.bucket, [(kv.key_for(u), v) for u, v in chunk.rows])
                deleted += await kv.delete_many(broker, self.bucket, [kv.key_for(u) for u in chunk.gone])
            await kv.put_state(broker, self.bucket, self._state(as_of, written))
            online.clear(self.con)
            different = await self._compare(broker, compare, as_of) if compare else (0, ())
        return written, deleted, as_of, everything, different

    async def _compare(self, broker: Broker, n: int, as_of: datetime | None) -> tuple[int, tuple[str, ...]]:
        """(rows compared, users whose KV row differs): a random sample of the store read back from the KV.
        valid_as_of is left out: it is the clock of the sync that wrote the row, not a feature."""
        sample = online.sample_values(self.con, self.store.registry, as_of or datetime.now(UTC), n)
        found = await kv.get_many(broker.nc, self.bucket, [kv.key_for(u) for u, _ in sample], REQUEST_TIMEOUT_SECONDS)
        different = []
        for user, value in sample:
            raw = found.get(kv.key_for(user))
            if raw is None or _features(raw) != _features(value):
                different.append(user)
        online.mark_users(self.con, different)  # the next sync writes them again
        return len(sample), tuple(sorted(different))

    def _valid_as_of(self) -> datetime | None:
        row = self.con.execute("SELECT valid_as_of FROM feature_state WHERE id = 1").fetchone()
        return row[0] if row else None

    def _state(self, as_of: datetime | None, written: int) -> dict[str, object]:
        return {
            "valid_as_of": as_of.astimezone(UTC).isoformat().replace("+00:00", "Z") if as_of else None,
            "fingerprint": self.store.registry.fingerprint,
            "columns": online.columns(self.con, self.store.registry),
            "written_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "rows_written": written,
        }


def _features(raw: bytes) -> dict[str, object]:
    row = dict(orjson.loads(raw))
    row.pop("valid_as_of", None)
    return row
