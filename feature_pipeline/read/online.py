"""Current features from the online store (JetStream KV), from any host that reaches NATS.

Three readers, one answer (a row per requested id, in order; an unknown user gets an empty row):
- `AsyncOnlineReader`: for async web apps (FastAPI): one direct get for one user, batched direct gets
  (`multi_last`, 1 000 keys a request) for many; any replica answers.
- `OnlineReader`: the same from plain code, on a private event-loop thread (`get_features` uses one).
- `OnlineReplica`: a dictionary kept current by a watch on the bucket (an ordered consumer), so a
  lookup reads memory; it holds every user's value (about the value's size plus ~150 bytes a user).

When NATS cannot be reached every reader raises `OnlineStoreError` within its timeout (1 s unless
told), saying which server and why: never a hang, and never rows of unknown age. A model server
catches it and falls back to its defaults.

Monotonic reads: the runs write each key's values in the order of the store's commits (see
`ingest.online`). The replica applies them in stream order, so it never goes back. Direct gets with
NATS_REPLICAS above 1 may be answered by a follower a moment behind the leader: two reads of one key
in a row can see the newer value, then the older one. A reader that must never see that keeps the
`valid_as_of` it last saw per user, or uses the replica.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import orjson
import pandas as pd
import pyarrow as pa
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from feature_pipeline import settings as config
from feature_pipeline.broker import kv
from feature_pipeline.broker.auth import NatsAuth, redact
from feature_pipeline.broker.fastpath import new_client
from feature_pipeline.broker.kv import OnlineStoreError

T = TypeVar("T")
TIMEOUT_SECONDS = 1.0
_ARROW: dict[str, pa.DataType] = {
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "VARCHAR": pa.string(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    "TIMESTAMP WITH TIME ZONE": pa.timestamp("us", tz="UTC"),
}
_FIXED = {"updated_at": "TIMESTAMPTZ", "valid_as_of": "TIMESTAMPTZ"}


class Schema:
    """The columns of a row, from the bucket's `meta.state` (a reader needs no registry file)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.fingerprint = str(state.get("fingerprint"))
        self.types: dict[str, str] = {**dict(state.get("columns") or {}), **_FIXED}
        fields: list[tuple[str, pa.DataType]] = [("user_id", pa.string())]
        fields += [(c, _ARROW.get(t.upper(), pa.string())) for c, t in self.types.items()]
        self.arrow = pa.schema(fields)

    def frame(self, ids: Sequence[str], rows: Sequence[dict[str, Any] | None]) -> pd.DataFrame:
        """One row per id: user_id, every feature, updated_at, valid_as_of (Arrow-backed dtypes, so integer
        features stay integers beside the empty rows of unknown users)."""
        columns = {"user_id": pd.arrays.ArrowExtensionArray(pa.array(ids, pa.string()))}
        for col, typ in self.types.items():
            values = [None if r is None else r.get(col) for r in rows]
            if typ.upper().startswith("TIMESTAMP"):
                values = [None if v is None else datetime.fromisoformat(v) for v in values]
            columns[col] = pd.arrays.ArrowExtensionArray(pa.array(values, self.arrow.field(col).type))
        # A dict of Arrow-backed arrays: about half the cost of Table.to_pandas for the few rows of a request.
        return pd.DataFrame(columns, copy=False)


def _decode(user_id: str, raw: bytes | None) -> dict[str, Any] | None:
    """A value, or None for an absent one or a hashed key whose value is another user's."""
    if raw is None:
        return None
    row: dict[str, Any] = orjson.loads(raw)
    return row if row.get("user_id") == user_id else None


class AsyncOnlineReader:
    """Direct reads of the bucket on one connection; create it inside the event loop that uses it."""

    def __init__(
        self,
        settings: config.Settings | None = None,
        *,
        bucket: str | None = None,
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        self.settings = settings or config.load()
        self.bucket = bucket or kv.bucket_for(self.settings.durable_prefix)
        self.timeout = timeout
        self.nc: Client | None = None
        self.schema: Schema | None = None

    async def connect(self) -> AsyncOnlineReader:
        self.nc = await connect(self.settings.nats_url, self.settings.nats_auth, self.timeout, self.bucket)
        return self

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def __aenter__(self) -> AsyncOnlineReader:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def get_rows(self, user_ids: Iterable[str]) -> list[dict[str, Any] | None]:
        """Each user's current row as a dict (None for an unknown user), in order: the cheapest read."""
        ids = [str(u) for u in user_ids]
        nc = self._ready()
        keys = [kv.key_for(u) for u in ids]
        try:
            found: dict[str, bytes | None] = {}
            if len(keys) == 1:
                found[keys[0]] = await kv.get_one(nc, self.bucket, keys[0], self.timeout)
            else:
                found.update(await kv.get_many(nc, self.bucket, list(dict.fromkeys(keys)), self.timeout))
        except OnlineStoreError:
            raise
        except Exception as exc:
            raise self._unavailable(exc) from None
        return [_decode(u, found.get(k)) for u, k in zip(ids, keys, strict=True)]

    async def get_features(self, user_ids: Iterable[str]) -> pd.DataFrame:
        """The DataFrame `feature_pipeline.get_features` returns, read from the KV."""
        ids = [str(u) for u in user_ids]
        rows = await self.get_rows(ids)
        return (await self._schema(rows)).frame(ids, rows)

    async def state(self) -> dict[str, Any] | None:
        """What the last sync wrote (`meta.state`): its clock, fingerprint, columns; None before the first."""
        try:
            return await kv.get_state(self._ready(), self.bucket, self.timeout)
        except OnlineStoreError:
            raise
        except Exception as exc:
            raise self._unavailable(exc) from None

    async def _schema(self, rows: Sequence[dict[str, Any] | None]) -> Schema:
        """Re-read when a row was written under another registry than the one cached."""
        prints = {r.get("fingerprint") for r in rows if r is not None}
        if self.schema is None or prints - {self.schema.fingerprint}:
            state = await self.state()
            if state is None:
                raise OnlineStoreError(
                    f"the online store {self.bucket} has no rows yet: no ingest run has written to it "
                    f"(is the pipeline running against NATS at {redact(self.settings.nats_url)}?)"
                )
            self.schema = Schema(state)
        return self.schema

    def _ready(self) -> Client:
        if self.nc is None:
            raise OnlineStoreError("the online reader is not connected: call connect() first")
        if not self.nc.is_connected:
            raise OnlineStoreError(
                f"cannot read the online store {self.bucket}: not connected to NATS at "
                f"{redact(self.settings.nats_url)} (reconnecting)"
            )
        return self.nc

    def _unavailable(self, exc: BaseException) -> OnlineStoreError:
        where = redact(self.settings.nats_url)
        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            return OnlineStoreError(
                f"cannot read the online store {self.bucket}: NATS at {where} did not answer in {self.timeout:g} s"
            )
        return OnlineStoreError(f"cannot read the online store {self.bucket} at {where}: {type(exc).__name__}: {exc}")


async def connect(url: str, auth: NatsAuth, timeout: float, bucket: str) -> Client:
    """A connection that reconnects by itself; the first attempt is bounded by `timeout` per server."""
    nc = new_client(None)  # the fast path for batched reads, when this nats-py passes its self-check

    async def quiet(_exc: Exception) -> None:
        return None

    servers = url.split(",")
    try:
        await asyncio.wait_for(
            nc.connect(
                servers=servers,
                name=f"feature-pipeline-reader {bucket}",
                connect_timeout=timeout,  # type: ignore[arg-type]  # nats-py takes seconds as a float
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]
                error_cb=quiet,
                **auth.connect_options(url),
            ),
            timeout * len(servers) + 1,
        )
    except Exception as exc:
        with_words = str(exc) or type(exc).__name__
        raise OnlineStoreError(
            f"cannot reach NATS at {redact(url)} for the online store {bucket}: {with_words}"
        ) from None
    return nc


class OnlineReader:
    """`AsyncOnlineReader` for plain code: its own event-loop thread; safe to share between threads."""

    def __init__(self, settings: config.Settings | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="feature-pipeline-reader", daemon=True).start()
        self._reader = AsyncOnlineReader(settings, **kwargs)
        self._connected = False

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(self._reader.timeout * 4 + 2)

    def _connect(self) -> AsyncOnlineReader:
        if not self._connected:
            self._call(self._reader.connect())
            self._connected = True
        return self._reader

    def get_rows(self, user_ids: Iterable[str]) -> list[dict[str, Any] | None]:
        return self._call(self._connect().get_rows(list(user_ids)))

    def get_features(self, user_ids: Iterable[str]) -> pd.DataFrame:
        return self._call(self._connect().get_features(list(user_ids)))

    def close(self) -> None:
        if self._connected:
            self._call(self._reader.close())
        self._loop.call_soon_threadsafe(self._loop.stop)


class OnlineReplica:
    """Every user's current value in memory, kept current by an ordered consumer on the bucket.

    `start()` returns once the replica holds every value the bucket had; then each run's writes arrive
    within milliseconds. While the connection is down, lookups raise OnlineStoreError (they do not
    serve rows of unknown age)."""

    def __init__(self, settings: config.Settings | None = None, *, bucket: str | None = None) -> None:
        self._reader = AsyncOnlineReader(settings, bucket=bucket)
        self.values: dict[str, bytes] = {}
        self.state: dict[str, Any] | None = None
        self._caught_up = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, timeout: float = 60.0) -> OnlineReplica:
        await self._reader.connect()
        nc = self._reader.nc
        assert nc is not None
        self._loop = asyncio.get_running_loop()
        js = nc.jetstream(timeout=self._reader.timeout * 5)
        self._sub = await js.subscribe(
            kv.subject_of(self._reader.bucket, ">"),
            stream=kv.stream_of(self._reader.bucket),
            cb=self._on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        info = await self._sub.consumer_info()
        # Caught up at once only when the server has nothing to send at all: messages it has sent may still
        # wait in this client's buffer (then the one with num_pending 0 sets it, in `_on_msg`).
        sent = info.delivered.consumer_seq if info.delivered else 0
        if info.num_pending == 0 and not sent:
            self._caught_up.set()
        try:
            await asyncio.wait_for(self._caught_up.wait(), timeout)
        except TimeoutError:
            raise OnlineStoreError(
                f"the replica of {self._reader.bucket} did not catch up in {timeout:g} s "
                f"({len(self.values)} values so far)"
            ) from None
        return self

    async def _on_msg(self, msg: Msg) -> None:
        key = msg.subject[len(kv.subject_of(self._reader.bucket, "")) :]
        hdrs = msg.headers or {}
        if hdrs.get(kv.OPERATION_HEADER) in ("DEL", "PURGE"):
            self.values.pop(key, None)
        elif key == kv.STATE_KEY:
            self.state = orjson.loads(msg.data)
            self._reader.schema = Schema(self.state)
        elif not key.startswith("meta."):
            self.values[key] = msg.data
        if msg.metadata.num_pending == 0:
            self._caught_up.set()

    def get_rows(self, user_ids: Iterable[str]) -> list[dict[str, Any] | None]:
        """Rows from memory: a dictionary read and a JSON decode per user."""
        nc = self._reader.nc
        if nc is None or not nc.is_connected:
            raise OnlineStoreError(
                f"the replica of {self._reader.bucket} is not connected to NATS, so its rows may be stale"
            )
        return [_decode(u, self.values.get(kv.key_for(u))) for u in (str(x) for x in user_ids)]

    def get_features(self, user_ids: Iterable[str]) -> pd.DataFrame:
        ids = [str(u) for u in user_ids]
        rows = self.get_rows(ids)
        schema = self._reader.schema
        if schema is None:
            raise OnlineStoreError(f"the online store {self._reader.bucket} has no rows yet")
        return schema.frame(ids, rows)

    async def close(self) -> None:
        await self._reader.close()
