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
from collections.abc import Iterator
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
    compared: int = 0  # rows of the last comparison: sampled from user_features and read back from the KV
    different: tuple[str, ...] = ()  # users among them whose KV row was not their row in the store
    compared_at: datetime | None = None  # when that comparison was made

    @classmethod
    def combine(cls, parts: list[SyncResult]) -> SyncResult:
        """Several shards' syncs as one: rows add up, the oldest comparison stands for all."""
        first = parts[0]
        compared = [p.compared_at for p in parts]
        return cls(
            bucket=first.bucket,
            written=sum(p.written for p in parts),
            deleted=sum(p.deleted for p in parts),
            seconds=round(sum(p.seconds for p in parts), 3),
            valid_as_of=min((p.valid_as_of for p in parts if p.valid_as_of), default=None),
            everything=any(p.everything for p in parts),
            compared=sum(p.compared for p in parts),
            different=tuple(sorted(u for p in parts for u in p.different)),
            compared_at=None if None in compared else min(c for c in compared if c is not None),
        )


COMPARE_AT_MOST = 1000  # rows a comparison reads back: one batched get


def sync(settings: Settings, store: FeatureStore, *, compare: int = 0, compare_every: float = 0.0) -> SyncResult:
    """Write every pending row to the bucket on a connection of its own (a run that has nothing to store, a
    replay's end); see `Writer` for the rest."""
    return sync_with(Writer(settings, store, compare=compare, compare_every=compare_every), store)


def sync_with(writer: Writer, store: FeatureStore, wait_seconds: float = 120.0) -> SyncResult:
    con = store.connect(wait_seconds=wait_seconds)  # the write lock, until the pending users are cleared
    try:
        writer(con)
    finally:
        con.close()
    assert writer.result is not None
    return writer.result


class Writer:
    """Called with the store's connection right after a refresh's COMMIT (`after_commit`), on the same
    connection, so the run opens the file once: writes every pending row to the bucket, then reads back
    `compare` random rows (at most COMPARE_AT_MOST) and compares them with the store, unless the last
    comparison is younger than `compare_every` seconds. Raises OnlineStoreError (or BrokerUnavailable) when
    it cannot write; `result` says what it did."""

    def __init__(self, settings: Settings, store: FeatureStore, *, compare: int = 0, compare_every: float = 0.0):
        self.settings, self.store = settings, store
        self.compare, self.compare_every = min(compare, COMPARE_AT_MOST), compare_every
        self.result: SyncResult | None = None

    def __call__(self, con: duckdb.DuckDBPyConnection) -> None:
        started = time.monotonic()
        job = _Sync(self.settings, self.store, con)
        written, deleted, everything = asyncio.run(job.run(self.compare, self.compare_every))
        seconds = round(time.monotonic() - started, 3)
        self.result = SyncResult(job.bucket, written, deleted, seconds, job.as_of, everything, *job.check)


class _Sync:
    def __init__(self, settings: Settings, store: FeatureStore, con: duckdb.DuckDBPyConnection) -> None:
        self.settings, self.store, self.con = settings, store, con
        self.bucket = kv.bucket_for(settings.durable_prefix)
        row = con.execute("SELECT valid_as_of FROM feature_state WHERE id = 1").fetchone()
        self.as_of: datetime | None = row[0] if row else None
        self.check: tuple[int, tuple[str, ...], datetime | None] = (0, (), None)

    async def run(self, compare: int, compare_every: float) -> tuple[int, int, bool]:
        s = self.settings
        async with await Broker.connect(s.nats_url, "feature-pipeline-online", s.nats_auth) as broker:
            await kv.ensure_bucket(broker, self.bucket, s.nats_replicas)
            # No state: the bucket is new, was emptied, or this store predates it; every row goes in.
            key = kv.state_key(self.store.shard, self.store.shards)
            everything = await kv.get_state(broker.nc, self.bucket, REQUEST_TIMEOUT_SECONDS, key) is None
            as_of = self.as_of or datetime.now(UTC)
            gone: list[str] = []

            def rows() -> Iterator[list[tuple[str, bytes]]]:
                """The values to write, a chunk at a time (read again if the fast write must be redone)."""
                gone.clear()
                chunks = online.every_value(self.con, self.store.registry, as_of) if everything else None
                for chunk in chunks or online.pending_values(self.con):
                    gone.extend(chunk.gone)
                    yield [(kv.key_for(u), v) for u, v in chunk.rows]

            written = await kv.put_many(broker, self.bucket, rows)
            deleted = await kv.delete_many(broker, self.bucket, [kv.key_for(u) for u in gone])
            state = self._state(written)
            await kv.put_state(broker, self.bucket, state, key)
            if key != kv.STATE_KEY:  # readers take the columns from the newest sync's, whichever shard made it
                await kv.put_state(broker, self.bucket, state)
            online.clear(self.con)
            if compare:
                await self._compare(broker, compare, compare_every, as_of)
        return written, deleted, everything

    async def _compare(self, broker: Broker, n: int, every: float, as_of: datetime) -> None:
        """A random sample of the store read back from the KV (or the last such comparison while it is younger
        than `every`); users whose rows differ are written again by the next sync. valid_as_of is left out of
        the comparison: it is the clock of the sync that wrote the row, not a feature."""
        last = online.last_check(self.con, every)
        if last is not None:
            self.check = (last[1], tuple(last[2]), last[0])
            return
        sample = online.sample_values(self.con, self.store.registry, as_of, n)
        found = await kv.get_many(broker.nc, self.bucket, [kv.key_for(u) for u, _ in sample], REQUEST_TIMEOUT_SECONDS)
        different = sorted(u for u, v in sample if (raw := found.get(kv.key_for(u))) is None or not _same(raw, v))
        online.mark_users(self.con, self.store.registry, different, as_of)
        at = datetime.now(UTC)
        online.record_check(self.con, at, len(sample), different)
        self.check = (len(sample), tuple(different), at)

    def _state(self, written: int) -> dict[str, object]:
        return {
            "valid_as_of": self.as_of.astimezone(UTC).isoformat().replace("+00:00", "Z") if self.as_of else None,
            "fingerprint": self.store.registry.fingerprint,
            "columns": online.columns(self.con, self.store.registry),
            "written_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "rows_written": written,
        }


def _same(a: bytes, b: bytes) -> bool:
    return _features(a) == _features(b)


def _features(raw: bytes) -> dict[str, object]:
    row = dict(orjson.loads(raw))
    row.pop("valid_as_of", None)
    return row
