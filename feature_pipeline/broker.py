"""The NATS JetStream side: topology, fast pulls, acks by reply subject, dead letters, lag.

Pulls are raw `$JS.API.CONSUMER.MSG.NEXT` requests with `no_wait` on a core inbox: about
7x faster than `PullSubscription.fetch`, and the request ends with a status message, so no
delivered message is left behind when the tick's connection closes (see
shared/notes/jetstream-facts.md, "Stragglers"). Acks are plain publishes to the reply
subjects, which work from any connection and after restarts, so a batch can be settled
by a later sensor tick than the one that fetched it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, OutboundBufferLimitError
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

CONNECT_TIMEOUT_SECONDS = 2
REQUEST_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class StreamSpec:
    key: str  # "signals", "feedback", "deadletter": table kind and consumer suffix
    name: str
    subject: str


SIGNALS = StreamSpec("signals", "SIGNALS", "signals.>")
FEEDBACK = StreamSpec("feedback", "FEEDBACK", "feedback.>")
DEADLETTER = StreamSpec("deadletter", "DEADLETTER", "deadletter.>")
STREAMS: tuple[StreamSpec, ...] = (SIGNALS, FEEDBACK, DEADLETTER)
STREAM_BY_NAME = {s.name: s for s in STREAMS}

# Headers a dead letter carries; the dead_letters table is filled from them.
H_STREAM = "FP-Original-Stream"
H_SUBJECT = "FP-Original-Subject"
H_SEQUENCE = "FP-Original-Sequence"
H_DELIVERIES = "FP-Delivery-Count"
H_REASON = "FP-Reason"
H_AT = "FP-Dead-Lettered-At"
H_STORED = "FP-Original-Time"


class BrokerUnavailable(RuntimeError):
    """NATS could not be reached or stopped answering; the text says which server and why."""


class TopologyError(RuntimeError):
    """A stream or consumer exists with settings the pipeline cannot work with."""


class MessageTooLarge(TopologyError):
    """The next message does not fit in the pull's byte budget."""


def redact(url: str) -> str:
    """Drop user:password@ from server URLs before they reach a log or the UI."""
    return ",".join(re.sub(r"^([A-Za-z]+://).*@", r"\1***@", u) for u in url.split(","))


@dataclass(frozen=True)
class NatsAuth:
    """How to authenticate and encrypt; empty strings mean 'not used'. Paths are files."""

    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    creds: str = ""
    nkey_seed: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def connect_options(self, url: str) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.user:
            opts.update(user=self.user, password=self.password)
        if self.token:
            opts["token"] = self.token
        if self.creds:
            opts["user_credentials"] = self.creds
        if self.nkey_seed:
            opts["nkeys_seed"] = self.nkey_seed
        if self.tls_ca or self.tls_cert or url.startswith("tls://"):
            ctx = ssl.create_default_context(cafile=self.tls_ca or None)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            opts["tls"] = ctx
        return opts


MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def advisory_stream(prefix: str) -> str:
    return f"{prefix}-advisories"


def consumer_name(prefix: str, spec: StreamSpec) -> str:
    return f"{prefix}-{spec.key}"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivered JetStream message and the metadata its reply subject carries."""

    stream: str
    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None
    stream_seq: int
    num_delivered: int
    stored_ns: int  # when the stream stored it, ns since the epoch


def parse_reply(reply: str) -> tuple[str, int, int, int]:
    """(stream, deliveries, stream sequence, stored ns) from `$JS.ACK...`, v1 or v2 token layout."""
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return t[2], int(t[4]), int(t[5]), int(t[7])
    if len(t) >= 11:  # $JS.ACK.<domain>.<acchash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.x]
        return t[4], int(t[6]), int(t[7]), int(t[9])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


def _reason(exc: BaseException) -> str:
    """nats-py reports a refused login as a generic error: say what the server said."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text


def _header_safe(text: str, limit: int = 1000) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


_MSG_ID_HEADER = b"NATS/1.0\r\nNats-Msg-Id:"
RawSink = Callable[[bytes, bytes, bytes, bytes | None], Awaitable[None]]


class _Client(Client):
    """nats-py's client with a short path for pull replies.

    A message for an inbox registered in `fp_sinks` goes straight to the pull's sink instead of
    becoming a Msg that passes through the subscription's queue, a task switch and an awaited
    callback, with every header block parsed on the way: that path cost more per message here
    than validating and staging it. Everything else takes nats-py's own path.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fp_sinks: dict[int, RawSink] = {}

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        sink = self.fp_sinks.get(sid)
        if sink is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        await sink(subject, reply, data, headers)

    async def fp_publish_many(self, subjects: Iterable[str], payload: bytes, chunk: int = 10_000) -> int:
        """The same small payload to many subjects (acks, keep-alives), as one PUB buffer per chunk
        instead of a publish() call each, which cost about 15 us a message here."""
        if self.is_closed:
            raise ConnectionClosedError
        if not self.is_connected:
            raise OutboundBufferLimitError
        tail = b" %d\r\n" % len(payload) + payload + b"\r\n"
        parts: list[bytes] = []
        n = 0
        for subject in subjects:
            if not subject or not subject.isprintable() or " " in subject:
                raise ValueError(f"not a subject: {subject!r}")
            parts.append(b"PUB " + subject.encode() + tail)
            if len(parts) >= chunk:
                await self._send_command(b"".join(parts))
                n += len(parts)
                parts = []
        if parts:
            await self._send_command(b"".join(parts))
            n += len(parts)
        return n

    async def fp_headers(self, raw: bytes | None) -> dict[str, str] | None:
        """A message's headers; the one a producer usually sets (Nats-Msg-Id) without the generic parser."""
        if not raw:
            return None
        if raw.startswith(_MSG_ID_HEADER) and raw.endswith(b"\r\n\r\n") and raw.count(b"\r\n") == 3:
            return {"Nats-Msg-Id": raw[len(_MSG_ID_HEADER) : -4].decode(errors="replace").strip()}
        return await self._process_headers(raw)


class Broker:
    """One connection for one sensor tick or CLI call; connect, use, close."""

    def __init__(self, nc: Client, url: str) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=REQUEST_TIMEOUT_SECONDS)
        self.url = url

    @classmethod
    async def connect(cls, url: str, name: str = "feature-pipeline", auth: NatsAuth | None = None) -> Broker:
        async def quiet(_exc: Exception) -> None:
            # nats-py logs every failed attempt with a stack trace otherwise; the caller reports once.
            return None

        servers = url.split(",")
        try:
            options = (auth or NatsAuth()).connect_options(url)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerUnavailable(f"cannot load the TLS files for NATS at {redact(url)}: {exc}") from None
        try:
            # nats-py's connect_timeout does not cover a hanging DNS lookup: bound the whole attempt.
            nc = _Client()
            await asyncio.wait_for(
                nc.connect(
                    servers=servers,
                    name=name,
                    connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    error_cb=quiet,
                    pending_size=256 * 1024 * 1024,
                    **options,
                ),
                CONNECT_TIMEOUT_SECONDS * len(servers) + 1,
            )
        except Exception as exc:
            raise BrokerUnavailable(f"cannot reach NATS at {redact(url)}: {_reason(exc)}") from None
        return cls(nc, url)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- topology ---------------------------------------------------------------------------

    async def ensure_streams(self) -> None:
        """Create the streams that are missing; existing ones are left as their owner made them."""
        for spec in STREAMS:
            try:
                await self.js.stream_info(spec.name)
            except NotFoundError:
                try:
                    await self.js.add_stream(
                        StreamConfig(name=spec.name, subjects=[spec.subject], storage=StorageType.FILE)
                    )
                except BadRequestError as exc:
                    raise TopologyError(f"cannot create stream {spec.name} for {spec.subject}: {exc}") from None

    async def ensure_consumers(
        self, prefix: str, *, max_deliver: int, ack_wait_seconds: int, max_ack_pending: int
    ) -> None:
        """Create or update the durable pull consumers in place (pull_subscribe would ignore config)."""
        for spec in STREAMS:
            config = ConsumerConfig(
                durable_name=consumer_name(prefix, spec),
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject=spec.subject,
                # A dead letter is never dropped: it is retried until the dead_letters table has it.
                max_deliver=-1 if spec is DEADLETTER else max_deliver,
                ack_wait=float(ack_wait_seconds),
                max_ack_pending=max_ack_pending,
                max_waiting=64,
            )
            try:
                await self.js.add_consumer(spec.name, config)
            except BadRequestError as exc:
                raise TopologyError(
                    f"consumer {config.durable_name} on stream {spec.name} exists with settings that cannot be "
                    f"changed in place ({exc.description}); delete it or pick another NATS_DURABLE_PREFIX"
                ) from None

    async def ensure_advisory_capture(self, prefix: str) -> str:
        """A stream and consumer that keep the server's MAX_DELIVERIES advisories for our consumers.

        The server drops a message from a consumer once it has been delivered max_deliver times
        without an ack, announcing it only by a core-NATS advisory. That happens without any failed
        run when deliveries expire unacked (a sensor that keeps crashing between fetch and stage).
        Captured, the sensor copies those messages to DEADLETTER instead of losing track of them.
        """
        name = advisory_stream(prefix)
        subjects = [f"{MAX_DELIVERIES_ADVISORY}.{s.name}.{consumer_name(prefix, s)}" for s in (SIGNALS, FEEDBACK)]
        try:
            await self.js.stream_info(name)
        except NotFoundError:
            await self.js.add_stream(
                StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE, max_age=7 * 24 * 3600)
            )
        config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=60.0, max_ack_pending=10_000)
        await self.js.add_consumer(name, config)
        return name

    async def exhausted(self, prefix: str, limit: int = 1000) -> list[tuple[Delivery | None, dict[str, Any], str]]:
        """Messages the server gave up on: (the original, or None if the stream no longer has it,
        the advisory, the advisory's reply subject to ack once handled)."""
        name = await self.ensure_advisory_capture(prefix)
        out = []
        for adv in await self.pull(name, name, batch=limit, max_bytes=8 * 1024 * 1024):
            info = json.loads(adv.data)
            original = None
            try:
                raw = await self.js.get_msg(info["stream"], seq=int(info["stream_seq"]))
                stored = raw.time if isinstance(raw.time, datetime) else ts_from_nats(str(raw.time))
                original = Delivery(
                    stream=info["stream"],
                    subject=raw.subject or "",
                    reply="",
                    data=raw.data or b"",
                    headers=dict(raw.headers) if raw.headers else None,
                    stream_seq=int(info["stream_seq"]),
                    num_delivered=int(info.get("deliveries", 0)),
                    stored_ns=int(stored.timestamp() * 1e9) if stored else 0,
                )
            except NotFoundError:
                pass
            out.append((original, info, adv.reply))
        return out

    # -- fetching ---------------------------------------------------------------------------

    async def pull(
        self, stream: str, consumer: str, *, batch: int, max_bytes: int, timeout: float = 5.0
    ) -> list[Delivery]:
        """Take what the consumer has now, up to `batch` messages / `max_bytes`; never waits for more."""
        got: list[Delivery] = []
        done = asyncio.Event()
        status: dict[str, str] = {}

        def on_status(hdrs: dict[str, str] | None) -> None:
            if hdrs and "Status" in hdrs:
                status.update(code=hdrs["Status"], text=hdrs.get("Description", ""))
                if hdrs["Status"] != "100":  # 100 = heartbeat; 404/408/409 end the request
                    done.set()

        def on_delivery(subject: str, reply: str, data: bytes, hdrs: dict[str, str] | None) -> None:
            _, delivered, seq, stored = parse_reply(reply)
            got.append(Delivery(stream, subject, reply, data, hdrs, seq, delivered, stored))
            if len(got) >= batch:
                done.set()

        async def on_raw(subject: bytes, reply: bytes, data: bytes, raw_headers: bytes | None) -> None:
            if not reply:
                on_status(await nc.fp_headers(raw_headers))
            else:
                on_delivery(subject.decode(), reply.decode(), data, await nc.fp_headers(raw_headers))

        async def on_msg(msg: Msg) -> None:
            if not msg.reply:
                on_status(msg.headers)
            else:
                on_delivery(msg.subject, msg.reply, msg.data, msg.headers)

        nc = self.nc
        fast = isinstance(nc, _Client)
        inbox = nc.new_inbox()
        sub = await nc.subscribe(
            inbox,
            cb=None if fast else on_msg,
            pending_msgs_limit=batch + 100,
            pending_bytes_limit=max_bytes * 2 + 1024 * 1024,
        )
        if isinstance(nc, _Client):
            nc.fp_sinks[sub._id] = on_raw
        try:
            request = {"batch": batch, "max_bytes": max_bytes, "no_wait": True}
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", json.dumps(request).encode(), reply=inbox
            )
            try:
                await asyncio.wait_for(done.wait(), timeout)
            except TimeoutError:
                if not got:
                    raise BrokerUnavailable(
                        f"NATS at {redact(self.url)} did not answer a pull on {stream}/{consumer} in {timeout:.0f} s"
                    ) from None
        finally:
            if isinstance(nc, _Client):
                nc.fp_sinks.pop(sub._id, None)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if not got and status.get("code") == "409" and "MaxBytes" in status.get("text", ""):
            raise MessageTooLarge(
                f"the next message on {stream} is larger than the {max_bytes} bytes left in this batch; "
                "FEATURE_PIPELINE_BATCH_MAX_BYTES must exceed the server's max_payload"
            )
        return got

    # -- settling ---------------------------------------------------------------------------

    async def _send(self, replies: Iterable[str], payload: bytes) -> int:
        n = 0
        if isinstance(self.nc, _Client):
            n = await self.nc.fp_publish_many(replies, payload)
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

    async def dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> int:
        """Copy each message to `deadletter.<subject>` with its reason, then TERM the original.

        The copy is confirmed by the DEADLETTER stream before the TERM is sent, so a crash
        in between leaves the original to be redelivered; the deterministic Nats-Msg-Id
        makes the second copy a duplicate the stream drops.
        """
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        for start in range(0, len(items), 1000):
            chunk = items[start : start + 1000]
            futures = []
            for d, reason in chunk:
                headers = {k: v for k, v in (d.headers or {}).items() if not k.startswith("Nats-") and k != "Status"}
                headers.update(
                    {
                        "Nats-Msg-Id": f"dl:{d.stream}:{d.stream_seq}",
                        H_STREAM: d.stream,
                        H_SUBJECT: d.subject,
                        H_SEQUENCE: str(d.stream_seq),
                        H_DELIVERIES: str(d.num_delivered),
                        H_REASON: _header_safe(reason),
                        H_AT: now,
                        H_STORED: str(d.stored_ns),
                    }
                )
                futures.append(
                    await self.js.publish_async(
                        f"deadletter.{d.subject}", d.data, headers=headers, stream=DEADLETTER.name
                    )
                )
            results = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), REQUEST_TIMEOUT_SECONDS * 2
            )
            for (d, reason), result in zip(chunk, results, strict=True):
                if isinstance(result, BaseException):
                    raise BrokerUnavailable(
                        f"could not copy {d.stream} #{d.stream_seq} to DEADLETTER: {result!r}"
                    ) from None
                if d.reply:  # a message the server already gave up on has nothing left to TERM
                    await self.nc.publish(d.reply, b"+TERM " + _header_safe(reason, 200).encode())
            await self.nc.flush(timeout=REQUEST_TIMEOUT_SECONDS)
        return len(items)

    # -- observing --------------------------------------------------------------------------

    async def stream_state(self, name: str) -> dict[str, Any]:
        """The raw `state` of STREAM.INFO: nats-py drops first_ts/last_ts."""
        resp = await self.nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=REQUEST_TIMEOUT_SECONDS)
        body = json.loads(resp.data)
        if "error" in body:
            raise NotFoundError(description=body["error"].get("description", ""))
        return body["state"]

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


def ts_from_nats(text: str | None) -> datetime | None:
    """NATS timestamps carry nanoseconds; datetime takes microseconds. '0001-01-01...' means never."""
    if not text or text.startswith("0001-"):
        return None
    m = re.match(r"^(.*?T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})$", text)
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    return datetime.fromisoformat(m.group(1) + frac + ("+00:00" if m.group(3) == "Z" else m.group(3)))
