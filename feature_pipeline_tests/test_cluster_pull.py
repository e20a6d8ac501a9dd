"""Pulls against a three-node JetStream cluster, from a server that is not the consumer's leader.

There the server's closing status can arrive before the messages it closes; a pull that stopped at
the status would leave those messages delivered but unread, invisible until ack_wait returns them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from feature_pipeline import streams
from feature_pipeline.broker import topology
from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.local import LocalCluster
from feature_pipeline.streams import PACKAGED

MESSAGES = 30_000
PREFIX = "cluster-pull"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path, 3).start()
    try:
        yield cluster
    finally:
        cluster.kill()


async def _create(url: str) -> None:
    async with await Broker.connect(url) as broker:
        await topology.ensure_streams(broker, PACKAGED, 3)
        await topology.ensure_consumers(
            broker, PREFIX, PACKAGED, max_deliver=5, ack_wait_seconds=120, max_ack_pending=100_000
        )


async def _publish_backlog(url: str) -> str:
    """The backlog; returns the name of the server that leads the consumer."""
    async with await Broker.connect(url) as broker:
        body = b'{"padding": "' + b"x" * 150 + b'"}'
        for _ in range(0, MESSAGES, 5_000):
            await asyncio.gather(*(broker.js.publish("signals.task.synced", body) for _ in range(5_000)))
        info = await broker.js.consumer_info(streams.SIGNALS.name, streams.consumer_name(PREFIX, streams.SIGNALS))
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader


def _prepared(cluster: LocalCluster) -> str:
    deadline = time.monotonic() + 60
    while True:  # the cluster elects its meta leader a few seconds after the nodes start
        try:
            asyncio.run(_create(cluster.url))
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return asyncio.run(_publish_backlog(cluster.url))


async def _pull_everything(url: str) -> list[tuple[int, int]]:
    """(messages received so far, messages the server counts as delivered and unacked) after each pull.

    Pulls alternate between a connection on the fast path and one on nats-py's public path."""
    consumer = streams.consumer_name(PREFIX, streams.SIGNALS)
    seen: list[tuple[int, int]] = []
    received = 0
    async with await Broker.connect(url, fast=True) as fast, await Broker.connect(url, fast=False) as public:
        assert fast.fast and not public.fast
        while received < MESSAGES:
            broker = (fast, public)[len(seen) % 2]
            got = await broker.pull(streams.SIGNALS.name, consumer, batch=8_000, max_bytes=4 * 1024 * 1024)
            assert got, f"a pull returned nothing with {MESSAGES - received} messages left"
            received += len(got)
            info = await broker.js.consumer_info(streams.SIGNALS.name, consumer)
            seen.append((received, info.num_ack_pending))
    return seen


def test_pull_from_a_follower_reads_every_message_it_was_sent(cluster: LocalCluster) -> None:
    leader = _prepared(cluster)
    follower = next(name for name in cluster.names if name != leader)
    seen = asyncio.run(_pull_everything(cluster.node(follower).url))
    assert len(seen) > 2, "the backlog should take several pulls (batch and byte limits)"
    assert all(received == pending for received, pending in seen), seen
    assert seen[-1] == (MESSAGES, MESSAGES)
