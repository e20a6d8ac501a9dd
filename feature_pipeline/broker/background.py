"""A NATS connection on its own event loop thread, for code that is not a coroutine.

The shared staging is called from plain functions (the run that stores a batch, the CLI) and
from inside the tick's own event loop, where `asyncio.run` is not allowed. Running its
connection on a private loop serves both the same way: each call blocks the caller until the
coroutine has finished over there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from feature_pipeline.broker.auth import NatsAuth
from feature_pipeline.broker.client import Broker

T = TypeVar("T")
CALL_TIMEOUT_SECONDS = 300.0  # uploads of a large batch take seconds, never minutes


class BackgroundBroker:
    """One connection, opened on first use, closed by `close`."""

    def __init__(self, url: str, auth: NatsAuth, name: str) -> None:
        self.url, self.auth, self.name = url, auth, name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{name}-loop", daemon=True)
        self._thread.start()
        self._broker: Broker | None = None

    def call(self, work: Callable[[Broker], Awaitable[T]], timeout: float = CALL_TIMEOUT_SECONDS) -> T:
        """Run `work(broker)` on the private loop and return its result (or raise its exception)."""

        async def go() -> T:
            if self._broker is None or self._broker.lost.is_set():
                self._broker = await Broker.connect(self.url, self.name, self.auth, fast=False)
            return await self._broker.until_lost(work(self._broker))

        return asyncio.run_coroutine_threadsafe(go(), self._loop).result(timeout)

    def close(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            asyncio.run_coroutine_threadsafe(broker.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
