"""One NATS connection: raw pulls, acks by reply subject, dead letters, stream state.

Pulls are raw `$JS.API.CONSUMER.MSG.NEXT` requests with `no_wait` on a core inbox: several
times faster than `PullSubscription.fetch`, and the request ends with a status message that says
how many messages it delivered, so no delivered message is left in flight when the connection
closes (a `fetch` that times out can leave stragglers that come back only after ack_wait).
Acks are plain publishes to the reply subjects, which work from any connection and after
restarts, so a batch can be settled by a later sensor tick than the one that fetched it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Awaitable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.errors import NotFoundError, ServiceUnavailableError

from feature_pipeline import streams
from feature_pipeline.broker.auth import NatsAuth, redact
from feature_pipeline.broker.deliveries import Delivery, parse_reply
from feature_pipeline.broker.fastpath import FastClient, new_client, subscription_id

CONNECT_TIMEOUT_SECONDS = 2
PENDING_MESSAGES_HEADER = "Nats-Pending-Messages"
REQUEST_TIMEOUT_SECONDS = 5
PENDING_BYTES = 256 * 1024 * 1024
T = TypeVar("T")


class BrokerUnavailable(RuntimeError):
    """NATS could not be reached or stopped answering; the text says which server and why."""


class TopologyError(RuntimeError):
    """A stream or consumer exists with settings the pipeline cannot work with."""


class MessageTooLarge(TopologyError):
    """The next message does not fit in the pull's byte budget."""


def _reason(exc: BaseException) -> str:
    """nats-py reports a refused login as a generic error: say what the server said."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text


def nats_problem(exc: BaseException, url: str) -> str:
    """A NATS error as a line for a tick log or a check: what is wrong, in words, never a bare repr."""
    where = redact(url)
    if isinstance(exc, BrokerUnavailable):
        return str(exc)
    if jetstream_unavailable(exc):  # the server answers, but no JetStream leader can (lost quorum, or disabled)
        return (
            f"NATS at {where} answers but JetStream is unavailable there ({type(exc).__name__}): no quorum in "
            "the cluster, or JetStream is not enabled; the streams are not missing, they cannot be read now"
        )
    if isinstance(exc, NotFoundError):  # a stream, consumer or bucket was deleted (or never made)
        what = getattr(exc, "description", None) or type(exc).__name__
        return (
            f"NATS at {where} says a stream, consumer or bucket is missing ({what}); the ingest sensor makes them "
            "again on its next tick"
        )
    if isinstance(exc, TimeoutError):
        return f"NATS at {where} did not answer in time ({type(exc).__name__})"
    return f"lost NATS at {where}: {type(exc).__name__}: {_reason(exc)}"


def jetstream_unavailable(exc: BaseException) -> bool:
    """503 from the JetStream API, or nobody answering it: the server is up, JetStream is not (no quorum)."""
    return isinstance(exc, ServiceUnavailableError | NoRespondersError)


def not_created(exc: BaseException) -> bool:
    """A stream, consumer or bucket the server says does not exist."""
    return isinstance(exc, NotFoundError) and not jetstream_unavailable(exc)


async def _quiet(_exc: Exception) -> None:
    """nats-py logs every failed attempt with a stack trace otherwise; the caller reports once."""
    return None


# What the server counts against max_payload besides the body: "NATS/1.0\r\n", "key: value\r\n" each, "\r\n".
def headers_size(headers: dict[str, str]) -> int:
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


BODY_OBJECT_HEADER_ROOM = 512  # margin for the headers a cut copy gains, and for the protocol line


def header_safe(text: str, limit: int = 1000) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class _Pull:
    """Collects one pull's replies until every message the server says it sent has arrived.

    The server ends a pull with a status: 404 (nothing to deliver), or 408/409 with
    `Nats-Pending-Messages`, the part of the request it did not fill. On a single server the status
    follows the last message; in a cluster the consumer's leader may be another server and the status
    can overtake messages still in transit, so the pull counts: it is complete when `batch` minus the
    pending count have arrived. Closing earlier would drop those messages until ack_wait returns them.
    """

    def __init__(self, stream: str, batch: int) -> None:
        self.stream = stream
        self.batch = batch
        self.expected = batch
        self.got: list[Delivery] = []
        self.done = asyncio.Event()
        self.status: dict[str, str] = {}

    def on_status(self, hdrs: dict[str, str] | None) -> None:
        if not hdrs or "Status" not in hdrs or hdrs["Status"] == "100":  # 100 = heartbeat
            return
        self.status.update(code=hdrs["Status"], text=hdrs.get("Description", ""))
        pending = hdrs.get(PENDING_MESSAGES_HEADER)
        # Without a count (404 nothing to deliver, a leader change) nothing more is coming that we can wait for.
        self.expected = self.batch - int(pending) if pending and pending.isdigit() else len(self.got)
        self._check()

    def on_delivery(self, subject: str, reply: str, data: bytes, hdrs: dict[str, str] | None) -> None:
        _, delivered, seq, stored = parse_reply(reply)
        self.got.append(Delivery(self.stream, subject, reply, data, hdrs, seq, delivered, stored))
        self._check()

    def _check(self) -> None:
        if len(self.got) >= self.expected:
            self.done.set()

    async def on_msg(self, msg: Msg) -> None:
        """nats-py's public path: every reply as a Msg."""
        if not msg.reply:
            self.on_status(msg.headers)
        else:
            self.on_delivery(msg.subject, msg.reply, msg.data, msg.headers)

    def raw_sink(self, nc: FastClient) -> Any:
        """The fast path: replies as raw bytes, straight from the protocol parser."""

        async def sink(subject: bytes, reply: bytes, data: bytes, raw_headers: bytes | None) -> None:
            if not reply:
                self.on_status(await nc.headers(raw_headers))
            else:
                self.on_delivery(subject.decode(), reply.decode(), data, await nc.headers(raw_headers))

        return sink

    @property
    def too_large(self) -> bool:
        return not self.got and self.status.get("code") == "409" and "MaxBytes" in self.status.get("text", "")


class Broker:
    """One connection for one sensor tick or CLI call; connect, use, close."""

    def __init__(self, nc: Client, url: str, lost: asyncio.Event | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=REQUEST_TIMEOUT_SECONDS)
        self.url = url
        self.lost = lost or asyncio.Event()  # set when the connection drops: a waiting pull ends at once

    @property
    def fast(self) -> bool:
        """Whether this connection takes the fast path (see broker.fastpath)."""
        return isinstance(self.nc, FastClient)

    @classmethod
    async def connect(
        cls, url: str, name: str = "feature-pipeline", auth: NatsAuth | None = None, *, fast: bool | None = None
    ) -> Broker:
        """Connect once, without reconnecting: a caller that loses NATS reports it and tries on its next call.

        `fast`: None takes the fast path whenever nats-py passes the self-check; True or False forces it."""
        try:
            options = (auth or NatsAuth()).connect_options(url)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerUnavailable(f"cannot load the TLS files for NATS at {redact(url)}: {exc}") from None
        lost = asyncio.Event()

        async def on_lost() -> None:
            lost.set()

        nc = new_client(fast)
        servers = url.split(",")
        connecting = nc.connect(
            servers=servers,
            name=name,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=_quiet,
            disconnected_cb=on_lost,
            closed_cb=on_lost,
            pending_size=PENDING_BYTES,
            **options,
        )
        try:
            # nats-py's connect_timeout does not cover a hanging DNS lookup: bound the whole attempt.
            await asyncio.wait_for(connecting, CONNECT_TIMEOUT_SECONDS * len(servers) + 1)
        except TimeoutError:  # a host that accepts and never greets (a partition, a wrong port), or DNS
            raise BrokerUnavailable(
                f"cannot reach NATS at {redact(url)}: no answer within {CONNECT_TIMEOUT_SECONDS * len(servers) + 1} s"
            ) from None
        except Exception as exc:
            raise BrokerUnavailable(f"cannot reach NATS at {redact(url)}: {_reason(exc)}") from None
        return cls(nc, url, lost)

    async def until_lost(self, work: Awaitable[T]) -> T:
        """`work`, cut short if the connection drops: nats-py leaves requests in flight to time out
        (5 s each), which would stall whoever waits on them. Cut short means cancelled, as a crash there
        would stop it; callers keep their state where a crash cannot lose it."""
        task = asyncio.ensure_future(work)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            await asyncio.wait([task, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise BrokerUnavailable(f"lost the connection to NATS at {redact(self.url)}")
        return task.result()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- fetching ---------------------------------------------------------------------------

    async def pull(
        self, stream: str, consumer: str, *, batch: int, max_bytes: int, timeout: float = 5.0
    ) -> list[Delivery]:
        """Take what the consumer has now, up to `batch` messages / `max_bytes`; never waits for more."""
        pull = _Pull(stream, batch)
        nc = self.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(
            inbox,
            cb=None if self.fast else pull.on_msg,
            pending_msgs_limit=batch + 100,
            pending_bytes_limit=max_bytes * 2 + 1024 * 1024,
        )
        if isinstance(nc, FastClient):
            nc.sinks[subscription_id(sub)] = pull.raw_sink(nc)
        try:
            request = json.dumps({"batch": batch, "max_bytes": max_bytes, "no_wait": True}).encode()
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", request, reply=inbox)
            await self._wait(pull, f"{stream}/{consumer}", timeout)
        finally:
            if isinstance(nc, FastClient):
                nc.sinks.pop(subscription_id(sub), None)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if pull.too_large:
            raise MessageTooLarge(
                f"the next message on {stream} is larger than the {max_bytes} bytes left in this batch; "
                "FEATURE_PIPELINE_BATCH_MAX_BYTES must exceed the server's max_payload"
            )
        return pull.got

    async def _wait(self, pull: _Pull, what: str, timeout: float) -> None:
        """Until the pull is complete, the connection drops, or `timeout`; an empty pull then is an error."""
        waits = [asyncio.ensure_future(pull.done.wait()), asyncio.ensure_future(self.lost.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if pull.done.is_set() or pull.got:
            return
        if self.lost.is_set():
            raise BrokerUnavailable(f"lost the connection to NATS at {redact(self.url)} during a pull on {what}")
        raise BrokerUnavailable(f"NATS at {redact(self.url)} did not answer a pull on {what} in {timeout:.0f} s")

    # -- settling ---------------------------------------------------------------------------

    async def _send(self, replies: Iterable[str], payload: bytes) -> int:
        n = 0
        if isinstance(self.nc, FastClient):
            n = await self.nc.publish_many(replies, payload)
        else:
            for reply in replies:
                await self.nc.publish(reply, payload)
                n += 1
        # A PING/PONG round trip: the server has read every ack before this returns.
        await self.nc.flush(timeout=REQUEST_TIMEOUT_SECONDS)
        return n

    async def ack(self, replies: Iterable[str]) -> int:
        return await self._send(replies, b"+ACK")

    async def keep_alive(self, replies: Iterable[str]) -> int:
        return await self._send(replies, b"+WPI")

    async def nak(self, replies_with_delay: Sequence[tuple[str, float]]) -> int:
        for reply, delay in replies_with_delay:
            payload = b"-NAK" if delay <= 0 else b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode()
            await self.nc.publish(reply, payload)
        await self.nc.flush(timeout=REQUEST_TIMEOUT_SECONDS)
        return len(replies_with_delay)

    async def dead_letter(self, items: Sequence[tuple[Delivery, str]], pipeline: str, *, terminate: bool = True) -> int:
        """Copy each message to `deadletter.<subject>` with its reason and `pipeline` (the durable
        prefix), then TERM the original (unless `terminate` is False: a run's poison, which the sensor
        acks with its batch).

        The copy is confirmed by the DEADLETTER stream before the TERM is sent, so a crash
        in between leaves the original to be redelivered; the deterministic Nats-Msg-Id
        makes the second copy a duplicate the stream drops. The id names the pipeline, so
        another pipeline's copy of the same message is not taken for this one's.
        """
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        for start in range(0, len(items), 1000):
            chunk = items[start : start + 1000]
            futures = [await self._copy_to_dead_letters(d, reason, now, pipeline) for d, reason in chunk]
            results = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), REQUEST_TIMEOUT_SECONDS * 2
            )
            for (d, reason), result in zip(chunk, results, strict=True):
                if isinstance(result, BaseException):
                    raise BrokerUnavailable(
                        f"could not copy {d.stream} #{d.stream_seq} to DEADLETTER: {result!r}"
                    ) from None
                if d.reply and terminate:  # a message the server already gave up on has nothing left to TERM
                    await self.nc.publish(d.reply, b"+TERM " + header_safe(reason, 200).encode())
            await self.nc.flush(timeout=REQUEST_TIMEOUT_SECONDS)
        return len(items)

    async def _copy_to_dead_letters(self, d: Delivery, reason: str, now: str, pipeline: str) -> Any:
        headers = {k: v for k, v in (d.headers or {}).items() if not k.startswith("Nats-") and k != "Status"}
        headers.update(
            {
                "Nats-Msg-Id": f"dl:{pipeline}:{d.stream}:{d.stream_seq}",
                streams.H_PIPELINE: pipeline,
                streams.H_STREAM: d.stream,
                streams.H_SUBJECT: d.subject,
                streams.H_SEQUENCE: str(d.stream_seq),
                streams.H_DELIVERIES: str(d.num_delivered),
                streams.H_REASON: header_safe(reason),
                streams.H_AT: now,
                streams.H_STORED: str(d.stored_ns),
            }
        )
        body = d.data
        if len(body) + headers_size(headers) + BODY_OBJECT_HEADER_ROOM > self.nc.max_payload:
            body = await self._keep_whole_body(d, headers)
        subject = streams.dead_letter_subject(d.subject)
        return await self.js.publish_async(subject, body, headers=headers, stream=streams.DEADLETTER.name)

    async def _keep_whole_body(self, d: Delivery, headers: dict[str, str]) -> bytes:
        """A body that would not fit the copy with its headers (the server would refuse it and drop the
        connection): kept whole in the DEADLETTER_BODIES object store, and the copy gets what fits."""
        name = f"{d.stream}.{d.stream_seq}"
        store = await self.js.object_store(streams.DEADLETTER_BODIES)
        await store.put(name, d.data)
        where = f"{streams.DEADLETTER_BODIES}/{name}"
        note = f" (the body, {len(d.data)} bytes, did not fit the copy: kept whole in object store {where}; cut here)"
        headers[streams.H_REASON] = header_safe(headers[streams.H_REASON], 1000 - len(note)) + note
        headers[streams.H_BODY_OBJECT] = where
        room = self.nc.max_payload - headers_size(headers) - BODY_OBJECT_HEADER_ROOM
        return d.data[: max(room, 0)]

    # -- observing --------------------------------------------------------------------------

    async def stream_state(self, name: str) -> dict[str, Any]:
        """The raw `state` of STREAM.INFO: nats-py drops first_ts/last_ts."""
        resp = await self.nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=REQUEST_TIMEOUT_SECONDS)
        body = json.loads(resp.data)
        if "error" in body:
            raise NotFoundError(description=body["error"].get("description", ""))
        return dict(body["state"])

    async def subject_counts(self, name: str, subjects_filter: str) -> dict[str, int]:
        resp = await self.nc.request(
            f"$JS.API.STREAM.INFO.{name}",
            json.dumps({"subjects_filter": subjects_filter}).encode(),
            timeout=REQUEST_TIMEOUT_SECONDS,
        )
        body = json.loads(resp.data)
        return dict(body.get("state", {}).get("subjects") or {})

    async def consumer_info(self, stream: str, consumer: str) -> Any:
        return await self.js.consumer_info(stream, consumer)
