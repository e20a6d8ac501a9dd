"""A short path through nats-py for pull replies and bulk acks, fenced behind a self-check.

nats-py turns every delivered message into a `Msg` that passes through the subscription's
queue, a task switch and an awaited callback, with its header block parsed on the way; and
each `publish()` costs about 15 us. For a pull of 20 000 messages that cost more than
validating and staging them, so `FastClient` hands pull replies straight to the pull and
writes acks as one PUB buffer per 10 000.

Both rely on nats-py internals (`Client._process_msg`, `_send_command`, `_process_headers`,
`Subscription._id`), which no release promises to keep. `problem()` checks, once per process,
that they exist with the signatures this module was written against; when they do not, the
broker takes nats-py's public API instead (slower, same results) and logs a warning once.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, OutboundBufferLimitError
from nats.protocol.parser import Parser

log = logging.getLogger("feature_pipeline.broker")
RawSink = Callable[[bytes, bytes, bytes, bytes | None], Awaitable[None]]
_MSG_ID_HEADER = b"NATS/1.0\r\nNats-Msg-Id:"

# What the fast path calls or overrides, with the parameters it passes.
_EXPECTED: tuple[tuple[type, str, tuple[str, ...]], ...] = (
    (Client, "_process_msg", ("self", "sid", "subject", "reply", "data", "headers")),
    (Client, "_send_command", ("self", "cmd", "priority")),
    (Client, "_process_headers", ("self", "headers")),
    (Subscription, "__init__", ("self", "conn", "id")),
)


@functools.cache
def problem() -> str | None:
    """Why the installed nats-py does not fit the fast path, or None when it does. Logged once."""
    found = _check()
    if found:
        log.warning("nats-py fast path off, using the public API (slower, same results): %s", found)
    return found


def _check() -> str | None:
    for owner, name, params in _EXPECTED:
        fn = getattr(owner, name, None)
        if fn is None:
            return f"{owner.__name__}.{name} is gone"
        have = tuple(inspect.signature(fn).parameters)
        if have[: len(params)] != params:
            return f"{owner.__name__}.{name}{have} no longer takes {params}"
    if "_process_msg(" not in inspect.getsource(Parser):
        return "the protocol parser no longer delivers messages through Client._process_msg"
    if "_id" not in inspect.getsource(Subscription.__init__):
        return "Subscription no longer keeps its sid in _id"
    return None


def subscription_id(sub: Subscription) -> int:
    return int(sub._id)


class FastClient(Client):
    """nats-py's client with a short path for pull replies (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.sinks: dict[int, RawSink] = {}

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        sink = self.sinks.get(sid)
        if sink is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        await sink(subject, reply, data, headers or None)

    async def publish_many(self, subjects: Iterable[str], payload: bytes, chunk: int = 10_000) -> int:
        """The same small payload to many subjects (acks, keep-alives), as one PUB buffer per chunk."""
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
                n += await self._send_parts(parts)
                parts = []
        return n + (await self._send_parts(parts) if parts else 0)

    async def publish_pairs(
        self, items: Iterable[tuple[str, bytes]], chunk: int = 5_000, reply: str | None = None
    ) -> int:
        """A payload of its own to each subject (the online store's rows), as one PUB buffer per chunk; with
        `reply`, JetStream sends each message's ack there."""
        if self.is_closed:
            raise ConnectionClosedError
        if not self.is_connected:
            raise OutboundBufferLimitError
        parts: list[bytes] = []
        n = 0
        head = b"PUB %s " + (reply.encode() + b" " if reply else b"") + b"%d\r\n%s\r\n"
        for subject, payload in items:
            parts.append(head % (subject.encode(), len(payload), payload))
            if len(parts) >= chunk:
                n += await self._send_parts(parts)
                parts = []
                await asyncio.sleep(0)  # let the flusher write: the buffer stays one chunk, not the whole sync
        return n + (await self._send_parts(parts) if parts else 0)

    async def _send_parts(self, parts: list[bytes]) -> int:
        await self._send_command(b"".join(parts))
        return len(parts)

    async def headers(self, raw: bytes | None) -> dict[str, str] | None:
        """A message's headers; the one a producer usually sets (Nats-Msg-Id) without the generic parser."""
        if not raw:
            return None
        if raw.startswith(_MSG_ID_HEADER) and raw.endswith(b"\r\n\r\n") and raw.count(b"\r\n") == 3:
            return {"Nats-Msg-Id": raw[len(_MSG_ID_HEADER) : -4].decode(errors="replace").strip()}
        parsed: Any = await self._process_headers(raw)
        return dict(parsed) if parsed else None


def new_client(fast: bool | None) -> Client:
    """A fast client when asked (or, with None, whenever the self-check passes), else nats-py's own."""
    if fast is None:
        fast = problem() is None
    elif fast and problem():
        raise RuntimeError(f"the nats-py fast path was asked for but cannot be used: {problem()}")
    return FastClient() if fast else Client()
