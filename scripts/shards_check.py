"""Two shards on two worker hosts: network namespaces on this machine, each host with its own folders.

- host A (10.77.0.11): the Dagster daemon and code server (the ingest sensor), one NATS node;
- host B0 (10.77.0.12): the warm run worker of shard 0, which owns `store.shard-0-of-2.duckdb`;
- host B1 (10.77.0.13): the warm run worker of shard 1, which owns `store.shard-1-of-2.duckdb`;
- host C (10.77.0.14): two NATS nodes, PostgreSQL (the Dagster instance) and Redis (Celery).

FEATURE_PIPELINE_SHARDS=2: the sensor on A splits what it pulls by user, and each shard's runs go to its own
Celery queue, served by the worker on the host that owns its file. A backlog is drained, then a live stream
runs while shard 1's whole worker is killed inside a run (the max-runtime backstop fails the run) and
restarted later. Checks: every confirmed event stored once, in its user's shard; shard 0 kept storing while
shard 1's worker was down; nothing dead-lettered; lag 0; the online store equals the union of the shards; a
training set joined on each shard's host (`training-set --shard K`) and merged (`--parts`) equals one store
fed the same events (a replay of the streams); `health` on A exits 0. Prints its checks, exits 1 when one fails.

    sudo .venv/bin/python scripts/shards_check.py [--backlog 20000] [--rate 200] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from cluster_check import Producer, create_streams, log, succeeds
from multihost_check import (
    NET,
    RUN_TIMEOUT_SECONDS,
    Host,
    network_down,
    network_up,
    pipeline_env,
    start_postgres,
    start_redis,
)

from feature_pipeline import settings, shards
from feature_pipeline.broker.local import LocalCluster
from feature_pipeline.ingest.replay import ReplayRange, replay
from feature_pipeline.read.online import OnlineReader
from feature_pipeline.read.training import training_set
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.testing import BIN, REPO, consumer_states, kill_group, query, wait_for

PREFIX = "shards"
SQL_IDS = "SELECT event_id, user_id FROM signal_events UNION ALL SELECT event_id, user_id FROM feedback_events"


def env_for(host: Host, cluster: LocalCluster, c: Host) -> dict[str, str]:
    """multihost_check's environment, with two shards, a prefix of this check's, and each host's own store path
    (a worker host's shard file is there)."""
    return {
        **pipeline_env(host, cluster, c),
        "FEATURE_PIPELINE_SHARDS": "2",
        "NATS_DURABLE_PREFIX": PREFIX,
        "FEATURE_STORE_PATH": str(host.root / "store.duckdb"),
        "FEATURE_PIPELINE_SERVING_PATH": str(host.root / "serving" / "user_features.parquet"),
    }


def ingest_runs(env: dict[str, str], shard: int) -> list[dg.RunRecord]:
    os.environ.update({k: v for k, v in env.items() if k.startswith(("DAGSTER_", "FEATURE_PIPELINE_CELERY"))})
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as inst:
        filters = dg.RunsFilter(job_name="ingest", tags={shards.SHARD_TAG: str(shard)})
        return list(inst.get_run_records(filters=filters))


def lag(url: str) -> int:
    infos = asyncio.run(consumer_states(url, PREFIX))
    return sum(i.num_pending + i.num_ack_pending for i in infos.values())


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if os.geteuid() != 0 or not shutil.which("ip"):
        print("needs root and iproute2's `ip` (network namespaces)", file=sys.stderr)
        return 2
    top = Path(tempfile.mkdtemp(prefix="fp-shards-"))
    top.chmod(0o755)  # PostgreSQL runs as its own user and must reach host C's folder
    names = ["a", "b0", "b1", "c"]
    dirs = {n: top / n for n in names}
    for d in dirs.values():
        d.mkdir(mode=0o711)
    hosts = [Host(n, f"{NET}.{11 + i}", dirs[n], [d for m, d in dirs.items() if m != n]) for i, n in enumerate(names)]
    cluster: LocalCluster | None = None
    network_down(hosts)
    network_up(hosts)
    try:
        a_host, _, _, c_host = hosts
        cluster = LocalCluster(
            top,
            size=3,
            hosts=[a_host.ip, c_host.ip, c_host.ip],
            prefixes=[a_host.prefix(), c_host.prefix(), c_host.prefix()],
            roots=[a_host.root / "nats", c_host.root / "nats", c_host.root / "nats"],
        )
        cluster.start()
        start_postgres(c_host)
        start_redis(c_host)
        log(f"hosts up under {top}: NATS {cluster.url}")
        return _scenario(a, cluster, hosts, top)
    finally:
        for proc in (p for h in hosts for p in h.procs):
            kill_group(proc)
        if cluster:
            cluster.kill()
        network_down(hosts)
        log(f"logs kept under {top}")


def _scenario(a: argparse.Namespace, cluster: LocalCluster, hosts: list[Host], top: Path) -> int:
    a_host, b0, b1, c_host = hosts
    env = {h.name: env_for(h, cluster, c_host) for h in hosts}
    workers = {0: b0, 1: b1}
    files = {k: Path(shards.part_name(h.root / "store.duckdb", k, 2)) for k, h in workers.items()}
    wait_for(lambda: succeeds(lambda: asyncio.run(create_streams(cluster.url, 3))), 60, "the cluster to elect leaders")
    backlog = Producer(cluster.url, a.backlog, None, seed=1)
    backlog.run()
    log(f"backlog of {len(backlog.confirmed)} events; the daemon on A, shard 0's worker on B0, shard 1's on B1")
    t0 = time.monotonic()
    a_host.spawn([str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")], env["a"], "daemon.log")
    worker_cmd = [str(BIN / "feature-pipeline"), "worker", "--shard"]
    procs = {k: h.spawn([*worker_cmd, str(k)], env[h.name], "worker.log") for k, h in workers.items()}

    def stored() -> list[tuple[str, str, int]]:
        return [(i, u, k) for k, f in files.items() for i, u in query(f, SQL_IDS)]

    wait_for(lambda: len(stored()) >= len(backlog.confirmed) and lag(cluster.url) == 0, a.timeout, "the backlog")
    log(f"backlog drained across hosts in {time.monotonic() - t0:.1f} s from daemon start")
    live = Producer(cluster.url, a.rate * a.seconds, a.rate, seed=2)
    live.start()
    target = wait_for(lambda: [r for r in ingest_runs(env["a"], 1) if r.dagster_run.status.value == "STARTED"],
                      180, "a run of shard 1 on B1")[0]  # fmt: skip
    log(f"killing shard 1's whole worker on B1 inside run {target.dagster_run.run_id}")
    down_at = time.time()
    kill_group(procs[1])
    wait_for(lambda: any(r.dagster_run.run_id == target.dagster_run.run_id and r.dagster_run.status.value == "FAILURE"
                         for r in ingest_runs(env["a"], 1)),
             RUN_TIMEOUT_SECONDS + 60, "the max-runtime backstop to fail the killed run")  # fmt: skip
    time.sleep(10)  # shard 1 stays down a little longer: shard 0 must go on meanwhile
    up_at = time.time()
    log("restarting shard 1's worker on B1")
    b1.spawn([*worker_cmd, "1"], env["b1"], "worker.log")
    live.join()
    confirmed = set(backlog.confirmed + live.confirmed)
    log(f"{len(confirmed)} events confirmed; waiting for them to be stored")
    wait_for(lambda: len(stored()) >= len(confirmed) and lag(cluster.url) == 0, a.timeout, "every event stored")
    wait_for(lambda: not [r for k in (0, 1) for r in ingest_runs(env["a"], k) if _status(r) == "STARTED"],
             60, "the last runs to end")  # fmt: skip
    during = [r for r in ingest_runs(env["a"], 0)
              if _status(r) == "SUCCESS" and r.start_time and down_at < r.start_time < up_at]  # fmt: skip
    log(f"shard 0 stored {len(during)} batches while shard 1's worker was down ({up_at - down_at:.0f} s)")
    checks = {
        **_stored_checks(stored(), confirmed, files),
        "shard 0 went on storing while shard 1's worker was down": len(during) >= 2,
        "lag 0": lag(cluster.url) == 0,
        "the online store equals the union of the shards": _online_equals_shards(env["c"], files),
        "a training set joined on each shard's host and merged equals one store's": _training_sets(
            hosts, env, cluster.url, top
        ),
        "health on host A exits 0": _health(a_host, env["a"]),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


def _status(record: dg.RunRecord) -> str:
    return str(record.dagster_run.status.value)


def _stored_checks(rows: list[tuple[str, str, int]], confirmed: set[str], files: dict[int, Path]) -> dict[str, bool]:
    ids = [i for i, _, _ in rows]
    dead = sum(query(f, "SELECT count(*) FROM dead_letters")[0][0] for f in files.values())
    log(f"events confirmed {len(confirmed)}, stored {len(ids)}, dead letters {dead}")
    return {
        "every confirmed event stored": set(ids) == confirmed,
        "none stored twice": len(ids) == len(set(ids)),
        "each event in its user's shard": all(shards.shard_of(u, 2) == k for _, u, k in rows),
        "nothing dead-lettered": dead == 0,
    }


def _online_equals_shards(env_c: dict[str, str], files: dict[int, Path]) -> bool:
    """Every user's row read from the KV on host C (which holds no store file) against the two files' rows."""
    rows: dict[str, dict[str, Any]] = {}
    for f in files.values():
        cols = [c for (c,) in query(f, "SELECT column_name FROM duckdb_columns() WHERE table_name = 'user_features'")]
        for r in query(f, "SELECT * FROM user_features"):
            rows[r[0]] = {c: _plain(v) for c, v in zip(cols, r, strict=True)}
    reader = OnlineReader(settings.load(env_c))
    try:
        online = dict(zip(rows, reader.get_rows(list(rows)), strict=True))
    finally:
        reader.close()
    same = all(o is not None and {c: _plain(o[c]) for c in rows[u]} == rows[u] for u, o in online.items())
    log(f"online store: {len(online)} users read back, equal to the shards' rows: {same}")
    return same and bool(rows)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return round(value.timestamp(), 6)
    if isinstance(value, str) and value.endswith("Z") and value[:4].isdigit():
        return round(datetime.fromisoformat(value).timestamp(), 6)
    return value


def _training_sets(hosts: list[Host], env: dict[str, dict[str, str]], url: str, top: Path) -> bool:
    """Scatter: each shard's host joins the labels of its users on its own file. Gather: the parts, copied to A,
    merged there. Against one store fed the same events: the streams replayed into a file of this process's."""
    a_host, b0, b1, _ = hosts
    now = datetime.now(UTC)
    labels = pa.table({"user_id": [f"u-{i}" for i in range(200)] + ["nobody"], "ts": [now] * 201})
    for h in (b0, b1, a_host):
        pq.write_table(labels, h.root / "labels.parquet")
    for k, h in ((0, b0), (1, b1)):
        cmd = [*h.prefix(), str(BIN / "feature-pipeline"), "training-set", str(h.root / "labels.parquet")]
        cmd += ["--shard", str(k), "--out", str(h.root / f"part-{k}.parquet")]
        out = subprocess.run(cmd, env=env[h.name], capture_output=True, text=True)
        if out.returncode:
            log(f"training-set --shard {k} on {h.name} failed: {out.stderr}")
            return False
        shutil.copyfile(h.root / f"part-{k}.parquet", a_host.root / f"part-{k}.parquet")  # the only copy: a result
    parts = [str(a_host.root / f"part-{k}.parquet") for k in (0, 1)]
    cmd = [*a_host.prefix(), str(BIN / "feature-pipeline"), "training-set", str(a_host.root / "labels.parquet")]
    cmd += ["--parts", *parts, "--out", str(a_host.root / "ts.parquet")]
    merged = subprocess.run(cmd, env=env["a"], capture_output=True, text=True)
    if merged.returncode:
        log(f"training-set --parts on A failed: {merged.stderr}")
        return False
    one = FeatureStore(top / "one.duckdb")
    for stream in ("SIGNALS", "FEEDBACK", "DEADLETTER"):
        replay(url, None, one, ReplayRange(stream), log=lambda _: None)
    expected = training_set(labels, store=one).to_pylist()
    got = pq.read_table(a_host.root / "ts.parquet").to_pylist()
    log(f"training set: {len(got)} rows from two shards' parts, equal to one store's: {got == expected}")
    return got == expected


def _health(a_host: Host, env_a: dict[str, str]) -> bool:
    out = subprocess.run([*a_host.prefix(), str(BIN / "feature-pipeline"), "health"], env=env_a,
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode:
        print(out.stdout + out.stderr)
    return out.returncode == 0


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=20_000, help="events drained first")
    parser.add_argument("--rate", type=int, default=200, help="events per second published meanwhile")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=300)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
