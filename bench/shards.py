"""Shards: the same backlog drained by 1 shard and by N shards in one run, with the CPU each costs.

    .venv/bin/python bench/shards.py [--events 500000] [--users 100000] [--shards 1,2] [--launcher warm]

One nats-server, one published backlog; then, for each number of shards, a fresh pipeline (its own durable
consumers, stores and DAGSTER_HOME) started the README's way (`up`'s warm workers, one per shard) drains it
to lag 0. Printed side by side, with the same run's bare fetch loop (ceiling (a)):

- ev/s from the first fetch to lag 0, end to end, and against ceiling (a);
- CPU-seconds per event summed over every process of the pipeline (daemon, code server, run workers, and
  nats-server's share during the drain): the target is N shards <= 1.1 x 1 shard;
- each shard's writer rate (events it stored / seconds its runs ran) and the sensor's staging rate (events
  fetched and staged per second of a tick's fetch), the two ceilings of a deployment;
- a model for H hosts, one shard each: min(H x the writer rate, the sensor's rate). A model, not a measurement;
- peak RSS of every process (target <= 1 GiB).

Exits 1 when a drain times out or loses events. Writes bench/results/shards-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ceiling  # noqa: E402
import common  # noqa: E402
import drain  # noqa: E402
from common import log, on_cleanup, percentile, run_cleanups  # noqa: E402

from feature_pipeline.broker.local import LocalNats  # noqa: E402
from feature_pipeline.ingest.tick import FETCH_CHUNK  # noqa: E402

CPU_RATIO_TARGET = 1.1
DRAIN_TARGET, CEILING_RATIO_TARGET = 30_000, 1.5
GIB_MIB = 1024.0
_FETCHED = re.compile(r"ingest_sensor - fetched ([^;]+); .*?fetch ([0-9.]+) s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--shards", default="1,2", help="the numbers of shards to compare, in this order")
    ap.add_argument("--launcher", choices=("warm", "spawn"), default="warm")
    ap.add_argument("--drain-timeout", type=float, help="per drain (default 180 + events/500 s)")
    ap.add_argument("--hosts", default="1,2,4,8", help="host counts the model is stated for")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    a.shards = [int(n) for n in a.shards.split(",")]
    a.hosts = [int(n) for n in a.hosts.split(",")]
    a.drain_timeout = a.drain_timeout or 180 + a.events / 500
    return a


def one(a: argparse.Namespace, nats: LocalNats, root: Path, n: int) -> dict[str, Any]:
    """A fresh pipeline with `n` shards drains the backlog; what it cost."""
    p = drain.Pipeline(
        root, nats, prefix=f"bench-{n}", env={"FEATURE_PIPELINE_SHARDS": str(n)}, warm=a.launcher == "warm"
    )
    sampler = common.RssSampler(0.5)
    sampler.watch("nats", nats.proc.pid)
    sampler.start()
    nats_before = common.cpu_seconds(nats.proc.pid) or 0.0
    try:
        p.start()
        assert p.daemon is not None
        sampler.watch("daemon", p.daemon.pid)
        for i, worker in enumerate(p.workers):
            sampler.watch(f"worker{i}", worker.pid)
        d = drain.backlog(p, a.events, a.drain_timeout)
        end = time.time()
        sampler.sample()
        nats_cpu = (common.cpu_seconds(nats.proc.pid) or 0.0) - nats_before
        d["cpu_seconds"] = {**sampler.cpu_by_kind(), "nats-server": round(nats_cpu, 2)}  # its share: this drain
        d["cpu_us_per_event"] = round(1e6 * sum(d["cpu_seconds"].values()) / max(d["events_stored"], 1), 1)
        d["peak_rss"] = sampler.by_kind()
        d["dagster"] = p.run_and_tick_stats(p.started_at - 5, end + 1)
        d["writers"] = writer_rates(p, n)
        d["sensor"] = sensor_rate(p.daemon_log.read_text(errors="replace"))
        log(f"  {n} shard(s): {d['cpu_us_per_event']} CPU-us/event, writers {d['writers']}, sensor {d['sensor']}")
        return d
    finally:
        sampler.stop()
        p.stop()


def writer_rates(p: drain.Pipeline, n: int) -> list[dict[str, Any]]:
    """Per shard: events stored, seconds its runs ran, and the rate its writer sustained while it had work."""
    import dagster as dg

    from feature_pipeline import shards

    out = []
    with p.instance() as inst:
        records = [r for r in inst.get_run_records(filters=dg.RunsFilter(job_name="ingest")) if r.end_time]
    for k, db in enumerate(p.stores):
        mine = [r for r in records if n == 1 or r.dagster_run.tags.get(shards.SHARD_TAG) == str(k)]
        busy = sum(r.end_time - r.start_time for r in mine if r.start_time)
        stored = sum(row[0] for row in common_query(db, drain.COUNT_SQL))
        out.append(
            {"shard": k, "events": stored, "runs": len(mine), "run_seconds": round(busy, 1),
             "events_per_run_second": round(stored / busy, 1) if busy else None}
        )  # fmt: skip
    return out


def common_query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    from feature_pipeline.testing import query

    return query(db, sql)


def sensor_rate(daemon_log: str) -> dict[str, Any]:
    """Events fetched and staged per second of each tick's fetch phase (ticks that fetched a full pull or more)."""
    rates = []
    for m in _FETCHED.finditer(daemon_log):
        fetched = sum(int(x.split()[0]) for x in m.group(1).split(", "))
        seconds = float(m.group(2))
        if fetched >= FETCH_CHUNK and seconds > 0:
            rates.append(fetched / seconds)
    return {
        "ticks": len(rates),
        "staged_per_s_median": round(percentile(rates, 0.5) or 0.0, 1),
        "staged_per_s_max": round(max(rates, default=0.0), 1),
    }


def table(r: dict[str, Any], a: argparse.Namespace) -> list[list[str]]:
    runs = r["runs"]
    fetch = r["ceiling"]["fetch"]["events_per_s"]
    head = ["figure", *(f"{n} shard(s)" for n in a.shards), "target"]
    rows = [head]

    def row(label: str, values: list[str], target: str = "") -> None:
        rows.append([label, *values, target])

    row("drain from the first fetch, ev/s", [f"{d.get('events_per_s_after_first_fetch', 0):,.0f}" for d in runs],
        f">= {DRAIN_TARGET:,}")  # fmt: skip
    row("drain end to end, ev/s", [f"{d['events_per_s']:,.0f}" for d in runs])
    row(f"ceiling (a) fetch(1000) + ack, same run: {fetch:,.0f} ev/s", ["" for _ in runs])
    row("from the first fetch / ceiling (a)",
        [f"{d.get('events_per_s_after_first_fetch', 0) / fetch:.2f} x" for d in runs], f">= {CEILING_RATIO_TARGET} x")  # fmt: skip
    row("CPU-us per event, all processes", [f"{d['cpu_us_per_event']:,.0f}" for d in runs],
        f"N <= {CPU_RATIO_TARGET} x 1 shard")  # fmt: skip
    for kind in ("daemon", "code server", "run worker", "nats-server"):
        row(f"  CPU-s {kind}", [f"{d['cpu_seconds'].get(kind, 0):,.1f}" for d in runs])
    row("writer rate per shard, ev per run-second",
        [", ".join(f"{w['events_per_run_second'] or 0:,.0f}" for w in d["writers"]) for d in runs])  # fmt: skip
    row("runs per shard", [", ".join(str(w["runs"]) for w in d["writers"]) for d in runs])
    row("sensor staging, ev/s per fetch second (median / max)",
        [f"{d['sensor']['staged_per_s_median']:,.0f} / {d['sensor']['staged_per_s_max']:,.0f}" for d in runs])  # fmt: skip
    for kind in ("daemon", "code server", "run worker", "nats-server"):
        row(f"peak RSS {kind}, MiB", [_peak(d, kind) for d in runs], "<= 1,024")
    return rows


def _peak(d: dict[str, Any], kind: str) -> str:
    v = d["peak_rss"].get(kind)
    return f"{max(v['peak_rss_mib'], v['peak_hwm_mib']):,.0f}" if v else "n/a"


def model(r: dict[str, Any], a: argparse.Namespace) -> list[str]:
    """H hosts, one shard each: min(H x the writer rate, the sensor's staging rate). Stated, not measured."""
    base = r["runs"][0]
    rates = [w["events_per_run_second"] for w in base["writers"] if w["events_per_run_second"]]
    writer = sum(rates) / len(rates) if rates else 0.0
    sensor = max(d["sensor"]["staged_per_s_median"] for d in r["runs"])
    lines = [f"model (not a measurement): one shard's writer {writer:,.0f} ev/s x H hosts, capped by the sensor's "
             f"{sensor:,.0f} ev/s"]  # fmt: skip
    lines += [f"  H = {h}: {min(h * writer, sensor):,.0f} ev/s" for h in a.hosts]
    return lines


def checks(r: dict[str, Any], a: argparse.Namespace) -> list[str]:
    """What fails the script: a drain that timed out or lost events, a process over 1 GiB."""
    out = []
    for n, d in zip(a.shards, r["runs"], strict=True):
        if d["timed_out"] or d["events_stored"] != a.events:
            out.append(f"{n} shard(s): stored {d['events_stored']:,} of {a.events:,} (timed out: {d['timed_out']})")
        for kind, v in d["peak_rss"].items():
            if max(v["peak_rss_mib"], v["peak_hwm_mib"]) > GIB_MIB:
                out.append(f"{n} shard(s): {kind} peaked over 1 GiB")
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="fp-shards-"))
    on_cleanup(lambda: shutil.rmtree(tmp, ignore_errors=True))
    common.start_watchdog(600 + len(a.shards) * (a.drain_timeout + 120))
    r: dict[str, Any] = {"started": stamp, "machine": common.machine_info(), "args": vars(a) | {"out": str(a.out)}}
    try:
        nats = LocalNats(tmp / "nats", log_file=str(tmp / "nats.log")).start()
        on_cleanup(nats.kill)
        asyncio.run(common.ensure_streams(nats.url))
        log(f"publishing the backlog: {a.events:,} events over {a.users:,} users")
        deadline = time.monotonic() + 60 + a.events / 2000
        r["publish_events_per_s"] = asyncio.run(common.publish_backlog(nats.url, a.events, a.users, "bk", deadline))
        r["ceiling"] = ceiling.run(nats.url, 1000, FETCH_CHUNK, 60 + a.events / 2000)
        r["runs"] = [one(a, nats, tmp / f"p{n}", n) for n in a.shards]
    finally:
        run_cleanups()
    rows = table(r, a)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    cpu = [d["cpu_us_per_event"] for d in r["runs"]]
    verdict = [f"CPU per event, {n} shards / 1 shard: {c / cpu[0]:.2f} x (target <= {CPU_RATIO_TARGET} x)"
               for n, c in zip(a.shards[1:], cpu[1:], strict=True)]  # fmt: skip
    r["text"] = "\n".join([text, "", *verdict, *model(r, a)])
    print("\n" + r["text"] + "\n", flush=True)
    problems = checks(r, a)
    for p in problems:
        print(f"FAIL: {p}")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"shards-{stamp}.json"
    path.write_text(json.dumps(r, indent=1, default=str))
    log(f"wrote {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
