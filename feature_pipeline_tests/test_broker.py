"""The nats-py fast path's fence: a self-check of the internals it relies on, and nats-py's public API
whenever that check fails. (Both paths run the batch lifecycle end to end in test_tick.py.)"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest
from nats.aio.client import Client

from feature_pipeline.broker import fastpath
from feature_pipeline.broker.client import Broker, BrokerUnavailable
from feature_pipeline.broker.local import LocalNats
from feature_pipeline.testing import run


@pytest.fixture
def fresh_check() -> Iterator[None]:
    """problem() is computed once per process; let a test compute it again."""
    fastpath.problem.cache_clear()
    yield
    fastpath.problem.cache_clear()


def test_the_pinned_nats_py_passes_the_self_check() -> None:
    assert fastpath.problem() is None


def test_a_changed_internal_signature_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream rewrite of a method the fast path overrides must turn it off, saying which method."""

    async def rewritten(self: Client, sid: int, msg: object) -> None:
        return None

    monkeypatch.setattr(Client, "_process_msg", rewritten)
    found = fastpath._check()
    assert found is not None and "Client._process_msg" in found and "no longer takes" in found


def test_a_removed_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Client, "_send_command")
    assert fastpath._check() == "Client._send_command is gone"


def test_failed_check_falls_back_to_the_public_api_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, fresh_check: None, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fastpath, "_check", lambda: "Client._process_msg is gone")
    with caplog.at_level(logging.WARNING, logger="feature_pipeline.broker"):
        first, second = fastpath.new_client(None), fastpath.new_client(None)
    assert type(first) is Client and type(second) is Client
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "nats-py fast path off, using the public API (slower, same results): Client._process_msg is gone"
    ]
    with pytest.raises(RuntimeError, match=r"cannot be used: Client\._process_msg is gone"):
        fastpath.new_client(True)


def test_connect_takes_the_path_asked_for(nats_server: LocalNats) -> None:
    async def paths() -> tuple[bool, bool, bool]:
        async with (
            await Broker.connect(nats_server.url) as auto,
            await Broker.connect(nats_server.url, fast=False) as public,
            await Broker.connect(nats_server.url, fast=True) as fast,
        ):
            return auto.fast, public.fast, fast.fast

    assert run(paths()) == (True, False, True)


def test_work_waiting_on_a_server_that_dies_ends_at_once(nats_server: LocalNats) -> None:
    """nats-py leaves requests in flight to time out when the connection drops; the broker cuts such
    work short at once, saying so, so a tick that loses NATS does not stall for seconds."""

    async def wait_then_kill() -> float:
        async with await Broker.connect(nats_server.url) as b:
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, nats_server.kill)
            with pytest.raises(BrokerUnavailable, match=r"lost the connection to NATS at nats://127\.0\.0\.1"):
                await b.until_lost(asyncio.sleep(30))
            return time.monotonic() - started

    assert run(wait_then_kill()) < 3
