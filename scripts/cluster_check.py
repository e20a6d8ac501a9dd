"""A NATS cluster under the pipeline: three nats-servers, streams and staging with three replicas, one node
killed and then the stream's leader killed while the pipeline drains a backlog and a producer keeps
publishing. Checks: every confirmed event stored exactly once, features equal to the raw rows, lag 0,
nothing left staged. Prints its checks and exits 1 when one fails.

    .venv/bin/python scripts/cluster_check.py [--backlog 20000] [--rate 200] [--staging nats]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
from nats.errors import Error as NatsError

from feature_pipeline import streams
from feature_pipeline.broker import topology
from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.local import LocalCluster, LocalNats
from feature_pipeline.samples import sample_event
from feature_pipeline.streams import PACKAGED
from feature_pipeline.testing import Pipeline, wait_for

SUBJECTS = ["signals.task.synced", "signals.task.completed", "feedback.recommendation.shown"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def _quiet(_exc: Exception) -> None:
    """A node going down is what this check does on purpose: no traceback per reconnect."""


class Producer(threading.Thread):
    """Publishes sample events with Nats-Msg-Id, retrying each until the cluster confirms it."""

    def __init__(self, url: str, count: int, rate: float | None, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.count, self.rate, self.rng = url, count, rate, random.Random(seed)
        self.confirmed: list[str] = []
        self.retries = 0

    def run(self) -> None:
        asyncio.run(self._publish())

    async def _publish(self) -> None:
        nc = await nats.connect(
            servers=self.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=_quiet
        )
        js = nc.jetstream(timeout=5)
        started = time.monotonic()
        for i in range(self.count):
            subject = self.rng.choice(SUBJECTS)
            event_id, body = sample_event(subject, f"u-{self.rng.randrange(200)}", datetime.now(UTC), self.rng)
            await self._confirm(js, subject, body, event_id)
            if self.rate and (ahead := (i + 1) / self.rate - (time.monotonic() - started)) > 0:
                await asyncio.sleep(ahead)
        await nc.close()

    async def _confirm(self, js: Any, subject: str, body: bytes, event_id: str) -> None:
        while True:
            try:
                await js.publish(subject, body, headers={"Nats-Msg-Id": event_id})
                self.confirmed.append(event_id)
                return
            except (NatsError, TimeoutError):  # a node died: the same id again, the stream drops a repeat
                self.retries += 1
                await asyncio.sleep(0.2)


async def _stream_leader(url: str, stream: str) -> str:
    async with await Broker.connect(url) as broker:
        info = await broker.js.stream_info(stream)
        return str(info.cluster.leader if info.cluster else "")


async def create_streams(url: str, replicas: int) -> None:
    async with await Broker.connect(url) as broker:
        await topology.ensure_streams(broker, PACKAGED, replicas)


def kill_and_restart(node: LocalNats, down_seconds: float) -> None:
    node.kill()
    time.sleep(down_seconds)
    node.start()


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    root = Path(tempfile.mkdtemp(prefix="fp-cluster-"))
    cluster = LocalCluster(root / "nats", size=3).start()
    log(f"cluster {cluster.url} (logs under {root / 'nats'})")
    pipeline = Pipeline(root / "pipeline", {"NATS_REPLICAS": "3", "FEATURE_PIPELINE_STAGING": a.staging}, nats=cluster)
    try:
        return _scenario(a, cluster, pipeline)
    finally:
        pipeline.close()
        cluster.kill()


def _scenario(a: argparse.Namespace, cluster: LocalCluster, p: Pipeline) -> int:
    wait_for(lambda: succeeds(lambda: asyncio.run(create_streams(cluster.url, 3))), 60, "the cluster to elect leaders")
    backlog = Producer(cluster.url, a.backlog, None, seed=1)
    backlog.run()
    log(f"backlog of {len(backlog.confirmed)} events published; starting the pipeline")
    p.start()
    live = Producer(cluster.url, a.rate * a.seconds, a.rate, seed=2)
    live.start()
    time.sleep(a.seconds / 4)
    log("killing node n1 for 10 s")
    kill_and_restart(cluster.nodes[1], 10)
    leader = asyncio.run(_stream_leader(cluster.url, streams.SIGNALS.name))
    log(f"killing the SIGNALS leader {leader} for 10 s")
    kill_and_restart(cluster.node(leader), 10)
    live.join()
    confirmed = backlog.confirmed + live.confirmed
    log(f"{len(confirmed)} events confirmed ({live.retries} publish retries); waiting for the pipeline")
    wait_for(lambda: len(p.stored_ids()) >= len(set(confirmed)) and p.settled(), a.timeout, "every event stored")
    return _report(p, confirmed)


def _report(p: Pipeline, confirmed: list[str]) -> int:
    stored = p.stored_ids()
    total = p.query("SELECT sum(signal_count_total) FROM user_features")[0][0]
    checks = {
        "every confirmed event stored": set(stored) == set(confirmed),
        "none stored twice": len(stored) == len(set(stored)),
        "features equal the raw rows": total == len(p.query("SELECT 1 FROM signal_events")),
        "lag 0, nothing staged": p.settled(),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"events confirmed {len(set(confirmed))}, stored {len(stored)}")
    return 0 if all(checks.values()) else 1


def succeeds(fn: Any) -> bool:
    """Whether fn() returns without raising (for wait_for on a cluster still electing leaders)."""
    try:
        fn()
        return True
    except Exception:
        return False


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=20_000, help="events published before the pipeline starts")
    parser.add_argument("--rate", type=int, default=200, help="events per second published while nodes are killed")
    parser.add_argument("--seconds", type=int, default=60, help="how long the live producer runs")
    parser.add_argument("--staging", choices=["folder", "nats"], default="nats")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for everything to be stored")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
