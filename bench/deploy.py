"""Runs on warm Celery workers against the spawn launcher, side by side in one run, and what staging in
NATS costs a batch.

Variants (each on its own nats-server, DuckDB file and Dagster instance):
- spawn: the repository's dagster.yaml (SQLite instance, queued runs, a new process per run);
- warm: deploy/dagster.yaml (PostgreSQL instance, runs sent at once to one warm Celery worker);
- warm+nats: the same with batches staged in NATS (what a multi-host deployment runs).
Per variant: the backlog drain (events published first, clock from daemon start), the launch latency
(one event every 7 s, so one run each: run created -> its transaction began), and publish->commit at a
steady rate. The staging phase stages one batch of `--staging-events` events in a folder and in NATS
and times commit, the run's copy, and reading the reply subjects back.

    .venv/bin/python bench/deploy.py                    # 1 000 000 backlog, 1 000/s for 120 s
    .venv/bin/python bench/deploy.py --events 200000 --steady-seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import drain  # noqa: E402
from common import log  # noqa: E402

from feature_pipeline.broker.deliveries import Delivery  # noqa: E402
from feature_pipeline.broker.local import LocalNats  # noqa: E402
from feature_pipeline.ingest.shared_staging import NatsStaging  # noqa: E402
from feature_pipeline.ingest.staging import FolderStaging, Staging  # noqa: E402
from feature_pipeline.samples import sample_event  # noqa: E402
from feature_pipeline.testing import REPO  # noqa: E402

LAUNCH_GAP_SECONDS = 7.0  # longer than a tick and a run: every probe event gets a run of its own


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="backlog size")
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--launches", type=int, default=15, help="probe events for the launch latency")
    ap.add_argument("--rate", type=int, default=1000, help="steady rate, events/s")
    ap.add_argument("--steady-seconds", type=float, default=120)
    ap.add_argument("--staging-events", type=int, default=100_000)
    ap.add_argument("--variants", default="spawn,warm,warm+nats")
    ap.add_argument("--postgres", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    return ap.parse_args(argv)


# -- one variant ----------------------------------------------------------------------------------


def variant(name: str, root: Path, a: argparse.Namespace, pg_url: str | None) -> dict[str, Any]:
    nats = LocalNats(root / "nats", log_file=str(root / "nats.log")).start()
    common.on_cleanup(nats.kill)
    env, yaml = {}, None
    if name.startswith("warm"):
        assert pg_url is not None
        env = {
            "DAGSTER_POSTGRES_URL": pg_url,
            "FEATURE_PIPELINE_CELERY_BROKER": a.redis,
            "FEATURE_PIPELINE_CELERY_BACKEND": a.redis,
            "FEATURE_PIPELINE_CELERY_QUEUE": f"fp-bench-{uuid.uuid4().hex[:8]}",
            "FEATURE_PIPELINE_STAGING": "nats" if name.endswith("nats") else "folder",
        }
        yaml = REPO / "deploy" / "dagster.yaml"
    p = drain.Pipeline(root / "pipeline", nats, env=env, instance_yaml=yaml)
    try:
        asyncio.run(common.ensure_streams(nats.url))
        log(f"[{name}] publishing the backlog: {a.events:,} events")
        asyncio.run(common.publish_backlog(nats.url, a.events, a.users, "bk", time.monotonic() + 600))
        p.start()
        if name.startswith("warm"):
            p.start_worker()
        out: dict[str, Any] = {"drain": drain.backlog(p, a.events, 180 + a.events / 500)}
        drain.wait_idle(p, 120)
        out["launch"] = launch_latency(p, a.launches)
        drain.wait_idle(p, 60)
        out["steady"] = drain.steady(p, a.rate, a.steady_seconds, 2 * a.steady_seconds, a.users)
        return out
    finally:
        p.stop()
        nats.kill()


def launch_latency(p: drain.Pipeline, n: int) -> dict[str, Any]:
    """One event every LAUNCH_GAP_SECONDS: each becomes one batch and one run; run created -> apply began."""
    log(f"launch latency: {n} single events, {LAUNCH_GAP_SECONDS:.0f} s apart")
    rng = random.Random(5)
    for i in range(n):
        subject = "signals.task.completed"
        _, body = sample_event(subject, f"probe-{i}", datetime.now(UTC), rng)
        asyncio.run(_publish_one(p.nats.url, subject, body))
        time.sleep(LAUNCH_GAP_SECONDS)
    drain.wait_idle(p, 60)
    started = dict(p.query("SELECT batch_id, epoch(committed_at) FROM ingested_batches"))
    with p.instance() as inst:
        import dagster as dg

        records = inst.get_run_records(filters=dg.RunsFilter(job_name="ingest"), limit=n)
    gaps = [
        started[r.dagster_run.tags["feature_pipeline/batch_id"]] - r.create_timestamp.timestamp()
        for r in records
        if r.dagster_run.tags.get("feature_pipeline/batch_id") in started
    ]
    result = {"runs": len(gaps), "median_s": _r(statistics.median(gaps)), "max_s": _r(max(gaps))} if gaps else {}
    log(f"  run created -> transaction began: {result}")
    return result


async def _publish_one(url: str, subject: str, body: bytes) -> None:
    nc = await common.connect(url, "bench-probe")
    try:
        await nc.jetstream().publish(subject, body)
    finally:
        await nc.close()


# -- staging cost ---------------------------------------------------------------------------------


def staging_cost(root: Path, events: int) -> dict[str, Any]:
    nats = LocalNats(root / "nats").start()
    deliveries = _deliveries(events)
    out = {}
    try:
        for name, staging in (
            ("folder", FolderStaging(root / "folder")),
            ("nats", NatsStaging(root / "scratch", nats.url, _auth(), "bench")),
        ):
            with staging:
                out[name] = _time_staging(staging, deliveries)
            log(f"  staging {name}: {out[name]}")
    finally:
        nats.kill()
    return out


def _auth() -> Any:
    from feature_pipeline.broker.auth import NatsAuth

    return NatsAuth()


def _deliveries(n: int) -> list[Delivery]:
    rng = random.Random(3)
    out = []
    for i in range(n):
        subject = "signals.task.synced"
        _, body = sample_event(subject, f"u-{i % 10_000}", datetime.now(UTC), rng)
        reply = f"$JS.ACK.SIGNALS.c.1.{i + 1}.{i + 1}.{time.time_ns()}.0"
        out.append(Delivery("SIGNALS", subject, reply, body, None, i + 1, 1, time.time_ns()))
    return out


def _time_staging(staging: Staging, deliveries: list[Delivery]) -> dict[str, float]:
    staging.remove(staging.stage(deliveries[:100]).batch_id)  # first use: buckets, Parquet writers
    t0 = time.perf_counter()
    manifest = staging.stage(deliveries)
    t1 = time.perf_counter()
    with staging.local_copy(manifest.batch_id) as folder:
        size = sum(f.stat().st_size for f in folder.iterdir())
    t2 = time.perf_counter()
    replies = sum(len(rows) for rows in staging.iter_deliveries(manifest.batch_id, ["reply"], chunk=50_000))
    t3 = time.perf_counter()
    staging.remove(manifest.batch_id)
    assert replies == len(deliveries)
    return {"stage_s": _r(t1 - t0), "run_copy_s": _r(t2 - t1), "read_replies_s": _r(t3 - t2), "mib": _r(size / 2**20)}


# -- main -----------------------------------------------------------------------------------------


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _database(dsn: str) -> tuple[str, Any]:
    import psycopg2

    admin = psycopg2.connect(dsn, connect_timeout=3)
    admin.autocommit = True
    name = f"fp_bench_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    params = admin.get_dsn_parameters()

    def drop() -> None:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')

    return f"postgresql+psycopg2://{params['user']}@{params['host']}:{params['port']}/{name}", drop


def table(r: dict[str, Any]) -> str:
    lines = [f"{'figure':<48}" + "".join(f"{v:>16}" for v in r["variants"])]

    def row(label: str, get: Any) -> None:
        cells = []
        for v in r["variants"]:
            try:
                cells.append(f"{get(r['variants'][v])!s:>16}")
            except (KeyError, TypeError):
                cells.append(f"{'-':>16}")
        lines.append(f"{label:<48}" + "".join(cells))

    row("backlog drain e2e, events/s", lambda v: f"{v['drain']['events_per_s']:,.0f}")
    row("run created -> transaction began, median s", lambda v: v["launch"]["median_s"])
    row("run created -> transaction began, max s", lambda v: v["launch"]["max_s"])
    row(f"steady {r['args']['rate']}/s publish->commit p50 s", lambda v: v["steady"]["latency_p50_s"])
    row(f"steady {r['args']['rate']}/s publish->commit p95 s", lambda v: v["steady"]["latency_p95_s"])
    row("steady lag bounded", lambda v: v["steady"]["lag_bounded"])
    for kind, figures in r.get("staging", {}).items():
        lines.append(f"staging one batch of {r['args']['staging_events']:,} events in {kind}: {figures}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="fp-deploy-bench-"))
    common.on_cleanup(lambda: shutil.rmtree(tmp, ignore_errors=True))
    r: dict[str, Any] = {"started": stamp, "machine": common.machine_info(), "args": vars(a) | {"out": str(a.out)}}
    r["variants"] = {}
    try:
        log(f"staging cost of one batch of {a.staging_events:,} events")
        r["staging"] = staging_cost(tmp / "staging", a.staging_events)
        for name in [v.strip() for v in a.variants.split(",") if v.strip()]:
            pg_url, drop = _database(a.postgres) if name.startswith("warm") else (None, None)
            try:
                r["variants"][name] = variant(name, tmp / name, a, pg_url)
            finally:
                if drop:
                    drop()
    finally:
        common.run_cleanups()
    r["machine"]["loadavg_at_end"] = list(__import__("os").getloadavg())
    r["table_text"] = table(r)
    print(r["table_text"])
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"deploy-{stamp}.json"
    path.write_text(json.dumps(r, indent=1, default=str))
    log(f"wrote {path}")
    ok = all("drain" in v and not v["drain"].get("timed_out") for v in r["variants"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
