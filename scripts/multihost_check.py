"""The pipeline spread over three hosts on this machine: network namespaces joined by a bridge, each
with its own directories, which the other hosts cannot see (each host's processes run in a mount
namespace where the others' directories are empty tmpfs). Needs root and `ip`.

- host A (10.77.0.11): the Dagster daemon and code server (the ingest sensor), one NATS node;
- host B (10.77.0.12): the warm Celery run worker, which owns the DuckDB file;
- host C (10.77.0.13): two NATS nodes, PostgreSQL (the Dagster instance) and Redis (Celery), and a model
  server's reader: no store file, only NATS. It keeps an in-process replica of the online store and reads
  users directly all through the live phase.

Streams and staged batches are replicated three times (NATS_REPLICAS=3, FEATURE_PIPELINE_STAGING=nats).
A backlog is published, then a live stream; mid-way the worker is killed inside a run (main process
and pool: nothing re-runs it, the max-runtime backstop fails it) and restarted, and a NATS node on host
C is killed and restarted. Checks: every confirmed event stored once, features equal to the raw rows,
lag 0, `feature-pipeline health` on host A exits 0, host B cannot read host A's directory; the reader on
host C read every user's current row, equal to the store on host B, its direct reads answered while host
B's worker was down, and each run's write reached it within 1 s of the run's success. Prints its checks
and exits 1 when one fails.

    sudo .venv/bin/python scripts/multihost_check.py [--backlog 10000] [--rate 100] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg
from cluster_check import Producer, create_streams, log, succeeds

from feature_pipeline import settings
from feature_pipeline.broker.kv import OnlineStoreError
from feature_pipeline.broker.local import LocalCluster
from feature_pipeline.read.online import AsyncOnlineReader, OnlineReplica
from feature_pipeline.testing import BIN, REPO, consumer_states, kill_group, query, wait_for

BRIDGE, NET = "fpbr0", "10.77.0"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
RUN_TIMEOUT_SECONDS = 30
FRESH_SECONDS = 1.0  # a run's rows readable on another host this soon after the run succeeds


@dataclass
class Host:
    name: str
    ip: str
    root: Path  # this host's own directory
    masked: list[Path]  # the other hosts' directories: empty in this host's mount namespace
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)  # killed at the end, whatever happens

    @property
    def ns(self) -> str:
        return f"fp-{self.name}"

    def prefix(self) -> list[str]:
        """Run a command on this host: in its network namespace, with the other hosts' folders masked."""
        mounts = " && ".join(f"mount -t tmpfs -o size=1m,mode=0 fpmask {p}" for p in self.masked)
        return ["ip", "netns", "exec", self.ns, "sh", "-c", f'{mounts} && exec "$@"', "sh"]

    def spawn(self, args: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.root / log_name, "ab") as out:
            proc = subprocess.Popen(
                [*self.prefix(), *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def network_up(hosts: list[Host]) -> None:
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for h in hosts:
        outside, inside = f"fp{h.name}0", f"fp{h.name}1"
        sh("ip", "netns", "add", h.ns)
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        sh("ip", "link", "set", inside, "netns", h.ns)
        sh("ip", "link", "set", outside, "master", BRIDGE)
        sh("ip", "link", "set", outside, "up")
        sh("ip", "netns", "exec", h.ns, "ip", "addr", "add", f"{h.ip}/24", "dev", inside)
        sh("ip", "netns", "exec", h.ns, "ip", "link", "set", inside, "up")
        sh("ip", "netns", "exec", h.ns, "ip", "link", "set", "lo", "up")


def network_down(hosts: list[Host]) -> None:
    for h in hosts:
        sh("ip", "netns", "delete", h.ns, check=False)
        sh("ip", "link", "delete", f"fp{h.name}0", check=False)
    sh("ip", "link", "delete", BRIDGE, check=False)


def start_postgres(c: Host) -> None:
    data = c.root / "pgdata"
    data.mkdir()
    shutil.chown(data, "postgres", "postgres")
    sh("runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {NET}.0/24 trust\n")
    args = ["runuser", "-u", "postgres", "--", str(PG_BIN / "postgres"), "-D", str(data), "-h", c.ip]
    c.spawn([*args, "-k", str(data)], dict(os.environ), "postgres.log")
    ready = [str(PG_BIN / "pg_isready"), "-h", c.ip, "-U", "postgres"]
    wait_for(lambda: sh(*ready, check=False).returncode == 0, 60, "PostgreSQL")
    sh("psql", "-h", c.ip, "-U", "postgres", "-c", "CREATE DATABASE dagster")


def start_redis(c: Host) -> None:
    (c.root / "redis").mkdir()
    # Reached from hosts A and B over the test network only; no password, so protected mode must go.
    args = ["redis-server", "--bind", c.ip, "--port", "6379", "--protected-mode", "no", "--save", ""]
    c.spawn([*args, "--appendonly", "no", "--dir", str(c.root / "redis")], dict(os.environ), "redis.log")
    wait_for(lambda: sh("redis-cli", "-h", c.ip, "ping", check=False).stdout.strip() == "PONG", 30, "Redis")


def pipeline_env(host: Host, cluster: LocalCluster, c: Host) -> dict[str, str]:
    """What every Dagster process needs; paths are the host's own (the store is on host B)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "FEATURE_", "DAGSTER_"))}
    redis = f"redis://{c.ip}:6379/0"
    env.update(
        {
            "DAGSTER_HOME": str(host.root / "dagster_home"),
            "DAGSTER_POSTGRES_URL": f"postgresql+psycopg2://postgres@{c.ip}:5432/dagster",
            "FEATURE_PIPELINE_CELERY_BROKER": redis,
            "FEATURE_PIPELINE_CELERY_BACKEND": redis,
            "FEATURE_PIPELINE_CELERY_QUEUE": "feature-pipeline",
            "NATS_URL": cluster.url,
            "NATS_REPLICAS": "3",
            "NATS_DURABLE_PREFIX": "multihost",
            "FEATURE_PIPELINE_STAGING": "nats",
            "FEATURE_PIPELINE_STAGING_DIR": str(host.root / "scratch"),
            "FEATURE_STORE_PATH": str(host.root.parent / "b" / "store.duckdb"),
            "FEATURE_PIPELINE_SERVING_PATH": str(host.root.parent / "b" / "serving" / "user_features.parquet"),
            "FEATURE_PIPELINE_RUN_TIMEOUT_SECONDS": str(RUN_TIMEOUT_SECONDS),
            "FEATURE_PIPELINE_NAK_DELAY_SECONDS": "1",
        }
    )
    home = host.root / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copyfile(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    return env


def instance(env: dict[str, str]) -> dg.DagsterInstance:
    os.environ.update({k: v for k, v in env.items() if k.startswith(("DAGSTER_", "FEATURE_PIPELINE_CELERY"))})
    return dg.DagsterInstance.from_config(env["DAGSTER_HOME"])


def runs(env: dict[str, str], status: dg.DagsterRunStatus) -> list[dg.DagsterRun]:
    with instance(env) as inst:
        filters = dg.RunsFilter(job_name="ingest", statuses=[status])
        return [r.dagster_run for r in inst.get_run_records(filters=filters)]


def lag(url: str) -> int:
    infos = asyncio.run(consumer_states(url, "multihost"))
    return sum(i.num_pending + i.num_ack_pending for i in infos.values())


def stored(db: Path) -> list[str]:
    sql = "SELECT event_id FROM signal_events UNION ALL SELECT event_id FROM feedback_events"
    return [r[0] for r in query(db, sql)]


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.reader:
        return reader(Path(a.reader[0]), Path(a.reader[1]))
    if os.geteuid() != 0 or not shutil.which("ip"):
        print("needs root and iproute2's `ip` (network namespaces)", file=sys.stderr)
        return 2
    top = Path(tempfile.mkdtemp(prefix="fp-multihost-"))
    top.chmod(0o755)  # PostgreSQL runs as its own user and must reach host C's folder
    dirs = {n: top / n for n in "abc"}
    for d in dirs.values():
        d.mkdir(mode=0o711)
    hosts = [Host(n, f"{NET}.{11 + i}", dirs[n], [d for m, d in dirs.items() if m != n]) for i, n in enumerate("abc")]
    cluster: LocalCluster | None = None
    network_down(hosts)
    network_up(hosts)
    try:
        a_host, _, c_host = hosts
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
        return _scenario(a, cluster, hosts)
    finally:
        for proc in (p for h in hosts for p in h.procs):
            kill_group(proc)
        if cluster:
            cluster.kill()
        network_down(hosts)
        log(f"logs kept under {top}")


def _scenario(a: argparse.Namespace, cluster: LocalCluster, hosts: list[Host]) -> int:
    a_host, b_host, c_host = hosts
    env_a, env_b = pipeline_env(a_host, cluster, c_host), pipeline_env(b_host, cluster, c_host)
    wait_for(lambda: succeeds(lambda: asyncio.run(create_streams(cluster.url, 3))), 60, "the cluster to elect leaders")
    backlog = Producer(cluster.url, a.backlog, None, seed=1)
    backlog.run()
    log(f"backlog of {len(backlog.confirmed)} events; starting the daemon on A and the worker on B")
    daemon = [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")]
    t0 = time.monotonic()
    a_host.spawn(daemon, env_a, "daemon.log")
    worker = b_host.spawn([str(BIN / "feature-pipeline"), "worker"], env_b, "worker.log")
    db = b_host.root / "store.duckdb"
    wait_for(lambda: len(stored(db)) >= len(backlog.confirmed) and lag(cluster.url) == 0, a.timeout, "the backlog")
    drain_seconds = time.monotonic() - t0
    rate = len(backlog.confirmed) / drain_seconds
    log(f"backlog drained across hosts in {drain_seconds:.1f} s from daemon start: {rate:,.0f} events/s")
    reader_env = pipeline_env(c_host, cluster, c_host)  # FEATURE_STORE_PATH names a file host C does not have
    out, stop = c_host.root / "reader.json", c_host.root / "reader.stop"
    reader = c_host.spawn([str(BIN / "python"), __file__, "--reader", str(out), str(stop)], reader_env, "reader.log")
    log("now a live stream, the worker killed inside a run, a NATS node killed; host C reads features throughout")
    live = Producer(cluster.url, a.rate * a.seconds, a.rate, seed=2)
    live.start()
    started = wait_for(lambda: runs(env_a, dg.DagsterRunStatus.STARTED), 180, "a run on host B")[0]
    log(f"killing the whole worker on B inside run {started.run_id}")
    b_down = time.time()
    kill_group(worker)
    failed = wait_for(lambda: [r for r in runs(env_a, dg.DagsterRunStatus.FAILURE) if r.run_id == started.run_id],
                      RUN_TIMEOUT_SECONDS + 60, "the max-runtime backstop to fail the killed run")  # fmt: skip
    log(f"run {failed[0].run_id} failed by run monitoring; restarting the worker; killing NATS node n1 on C")
    b_host.spawn([str(BIN / "feature-pipeline"), "worker"], env_b, "worker.log")
    b_up = time.time()
    cluster.node("n1").kill()
    time.sleep(10)
    cluster.node("n1").start()
    live.join()
    confirmed = set(backlog.confirmed + live.confirmed)
    log(f"{len(confirmed)} events confirmed; waiting for them to be stored")
    wait_for(lambda: len(stored(db)) >= len(confirmed) and lag(cluster.url) == 0, a.timeout, "every event stored")
    wait_for(lambda: not runs(env_a, dg.DagsterRunStatus.STARTED), 60, "the last run to end")
    stop.touch()
    reader.wait(120)
    online = _online_checks(json.loads(out.read_text()), db, env_a, (b_down, b_up))
    return _report(db, confirmed, a_host, b_host, env_a, cluster.url, online)


def _online_checks(
    seen: dict[str, Any], db: Path, env_a: dict[str, str], b_down: tuple[float, float]
) -> dict[str, bool]:
    """Host C's reader against the store on host B: rows, reads while B was down, freshness per run."""
    cols = [c for (c,) in query(db, "SELECT column_name FROM duckdb_columns() WHERE table_name = 'user_features'")]
    store = {r[0]: dict(zip(cols, map(_plain, r), strict=True)) for r in query(db, "SELECT * FROM user_features")}
    rows = {u: {c: _plain(r[c]) for c in cols} for u, r in seen["rows"].items()}
    during = [t for t in seen["ok_reads"] if b_down[0] <= t <= b_down[1]]
    with instance(env_a) as inst:
        done = inst.get_run_records(filters=dg.RunsFilter(job_name="ingest", statuses=[dg.DagsterRunStatus.SUCCESS]))
    ends = sorted(r.end_time for r in done if r.end_time)
    # Each sync's state names when it was written; the run that wrote it ended at the first end after that.
    # The first state is the one the bucket held when the reader started: not a write it waited for.
    late = [seen_at - min((e for e in ends if e >= w), default=seen_at) for w, seen_at in seen["states"][1:]]
    log(
        f"reader on C: {len(rows)} rows, {seen['reads']} direct reads (some {len(during)} sampled while B was "
        f"down), {len(seen['errors'])} errors; a run's rows seen at most {max(late, default=0):.3f} s after it ended"
    )
    return {
        "host C read every user's current row from the KV, equal to the store on B": rows == store,
        "host C's direct reads answered while host B's worker was down": bool(during),
        f"each run's rows readable on host C within {FRESH_SECONDS:.0f} s of its success": bool(late)
        and max(late) <= FRESH_SECONDS,
    }


def _plain(value: Any) -> Any:
    """Times as epoch seconds (the KV holds ISO text, the store datetimes); other values as they are."""
    if isinstance(value, datetime):
        return round(value.timestamp(), 6)
    if isinstance(value, str) and value.endswith("Z") and value[:4].isdigit():
        return round(datetime.fromisoformat(value).timestamp(), 6)
    return value


def reader(out: Path, stop: Path) -> int:
    """Host C's model server: a replica of the online store, and direct reads of random users, until `stop`.
    Records when each sync's state (its written_at) was first seen, and finally every user's row."""
    cfg = settings.load()
    seen: dict[str, Any] = {"states": [], "reads": 0, "ok_reads": [], "errors": []}

    async def go() -> None:
        replica = await OnlineReplica(cfg).start(timeout=120)
        direct = await AsyncOnlineReader(cfg, timeout=1.0).connect()
        last = None
        while not stop.exists():
            state = replica.state or {}
            if state.get("written_at") != last:
                last = state.get("written_at")
                seen["states"].append((datetime.fromisoformat(last).timestamp(), time.time()))
            users = [f"u-{random.randrange(200)}" for _ in range(10)]  # the producers' users
            try:
                await direct.get_rows(users)
                seen["ok_reads"].append(time.time())
            except OnlineStoreError as exc:
                seen["errors"].append(str(exc))
            seen["reads"] += 1
            await asyncio.sleep(0.005)
        seen["rows"] = {json.loads(v)["user_id"]: json.loads(v) for v in replica.values.values()}
        await replica.close()
        await direct.close()

    asyncio.run(go())
    seen["ok_reads"] = seen["ok_reads"][::10] + seen["ok_reads"][-1:]  # a sample is enough to place them in time
    out.write_text(json.dumps(seen))
    return 0


def _report(
    db: Path, confirmed: set[str], a_host: Host, b_host: Host, env_a: dict[str, str], url: str, online: dict[str, bool]
) -> int:
    health = subprocess.run([*a_host.prefix(), str(BIN / "feature-pipeline"), "health"], env=env_a,
                            capture_output=True, text=True)  # fmt: skip
    peek = subprocess.run([*b_host.prefix(), "ls", "-A", str(a_host.root)], capture_output=True, text=True)
    ids = stored(db)
    total = query(db, "SELECT sum(signal_count_total) FROM user_features")[0][0]
    checks = {
        "every confirmed event stored": set(ids) == confirmed,
        "none stored twice": len(ids) == len(set(ids)),
        "features equal the raw rows": total == len(query(db, "SELECT 1 FROM signal_events")),
        "lag 0": lag(url) == 0,
        "health on host A exits 0": health.returncode == 0,
        "host B sees nothing of host A's directory": peek.returncode == 0 and peek.stdout.strip() == "",
        **online,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"events confirmed {len(confirmed)}, stored {len(ids)}")
    if health.returncode:
        print(health.stdout + health.stderr)
    return 0 if all(checks.values()) else 1


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=100_000, help="events drained first, timed")
    parser.add_argument("--rate", type=int, default=100, help="events per second published meanwhile")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--reader", nargs=2, help=argparse.SUPPRESS)  # host C's reader process: OUT STOP
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
