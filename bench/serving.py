"""Serving reads: the online store (JetStream KV) side by side with the Parquet reader main had, per user count.

For each size (100 000, 1 M and 10 M users by default) a fresh store gets that many user_features rows from
DuckDB SQL (shaped by the packaged registry), and its own nats-server gets them through `ingest.online.sync`,
the code every run calls (the first sync writes every row: the bulk load). Then, on the same data:

- the Parquet reader as main had it before the online store (the export file loaded into pandas, then
  `reindex` per call), in a child process: load time, 1 user and 100 users per call, peak RSS;
- direct reads from the KV (`OnlineReader.get_features`, the DataFrame `get_features` returns, and
  `get_rows`, dicts) in a child process: 1 and 100 users, p50 / p99, peak RSS;
- the in-process replica (`OnlineReplica`) in that child: its load, its lookups, its memory;
- a run at 1 000 events/s: a 5 000-event batch (one sensor interval) applied with `apply_batch`, then
  its rows written with `sync`; and how long after the sync returns the replica shows the new row.

    .venv/bin/python bench/serving.py                           # 100 k, 1 M, 10 M users (about 15 min)
    .venv/bin/python bench/serving.py --users 100000 1000000    # quicker

Prints the table, writes bench/results/serving-<time>.json, exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pandas as pd
import pyarrow.parquet as pq
from common import log, percentile
from growth import make_batch

from feature_pipeline.broker import kv
from feature_pipeline.broker.kv import OnlineStoreError
from feature_pipeline.broker.local import LocalNats
from feature_pipeline.ingest.online import Writer, sync
from feature_pipeline.ingest.staging import FolderStaging
from feature_pipeline.read.online import OnlineReader, OnlineReplica
from feature_pipeline.settings import Settings, from_raw
from feature_pipeline.store.feature_store import FeatureStore

RESULTS = Path(__file__).resolve().parent / "results"
WARM_UP_SECONDS = 10
PARQUET_MAX_USERS = 1_000_000  # main's reader holds the whole copy in pandas: 10 M is KV-only
TARGETS = {
    "kv_1_p50_ms": 1.0,
    "kv_1_p99_ms": 5.0,
    "kv_100_p50_ms": 6.0,
    "kv_100_p99_ms": 10.0,
    "flat_ratio": 1.5,  # the largest size's figure over the smallest's
    "replica_1_p99_ms": 0.1,
    "replica_100_p99_ms": 1.0,
    "write_share": 0.10,  # a run's KV write time over its apply time, at 1 000 events/s
    "fresh_s": 1.0,
}
_VALUES = {
    "BIGINT": "CAST(hash(i, '{c}') % 1000 AS BIGINT)",
    "DOUBLE": "(hash(i, '{c}') % 1000) / 1000.0",
    "VARCHAR": "'v' || (hash(i, '{c}') % 100)",
    "BOOLEAN": "hash(i, '{c}') % 2 = 0",
    "TIMESTAMPTZ": "now() - to_seconds(CAST(hash(i, '{c}') % 86400 AS BIGINT))",
}


def fill(store: FeatureStore, users: int) -> None:
    """`users` rows in user_features, and the clock, as a store that has run for a while would hold."""
    cols = ", ".join(_VALUES[f.column_type].format(c=f.name) for f in store.registry.features)
    con = store.connect()
    try:
        con.execute(f"INSERT INTO user_features SELECT 'u-' || i, {cols}, now() FROM range({users}) t(i)")
        con.execute("INSERT OR REPLACE INTO feature_state VALUES (1, now(), $fp)", {"fp": store.registry.fingerprint})
        con.execute("CHECKPOINT")
    finally:
        con.close()


def busy(pid: int) -> tuple[float, int]:
    """CPU seconds (utime + stime) and bytes read and written so far by a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(io["rchar"]) + int(io["wchar"])


def until_idle(nats: LocalNats, limit_s: float = 1800.0) -> float:
    """Wait until nats-server has used under 5 % of a core and moved under 1 MiB to or from its files for
    three seconds in a row: after a bulk load it goes on writing its files for a while (seconds at 1 M
    users, minutes at 10 M), with little CPU, and figures taken meanwhile measure that, not the readers or
    the runs. Returns how long it took."""
    assert nats.proc is not None
    t0, quiet = time.monotonic(), 0
    while quiet < 3 and time.monotonic() - t0 < limit_s:
        cpu, moved = busy(nats.proc.pid)
        time.sleep(1.0)
        cpu2, moved2 = busy(nats.proc.pid)
        quiet = quiet + 1 if cpu2 - cpu < 0.05 and moved2 - moved < 2**20 else 0
    return round(time.monotonic() - t0, 1)


def timed(fn: Callable[[], object], n: int) -> dict[str, float | None]:
    fn()
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        took.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(statistics.median(took), 3), "p99_ms": round(percentile(took, 0.99) or 0, 3)}


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the forking parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def ids(users: int, k: int) -> list[str]:
    return [f"u-{random.randrange(users)}" for _ in range(k)]


# -- the child processes: each measures its own memory ----------------------------------------------------


def child_parquet(path: str, users: int, reads: int) -> dict[str, Any]:
    """main's reader: the whole copy into pandas once, then `reindex` per call."""
    t0 = time.perf_counter()
    frame = pq.read_table(path).to_pandas(types_mapper=pd.ArrowDtype).set_index("user_id")
    load = time.perf_counter() - t0

    def get(k: int) -> pd.DataFrame:
        out = frame.reindex(ids(users, k))
        out.index.name = "user_id"
        return out.reset_index()

    return {
        "load_s": round(load, 3),
        "one": timed(lambda: get(1), reads),
        "hundred": timed(lambda: get(100), max(reads // 10, 50)),
        "peak_rss_mib": peak_rss_mib(),
    }


def child_kv(cfg: Settings, users: int, reads: int) -> dict[str, Any]:
    reader = OnlineReader(cfg)
    # Ten seconds of reads first, not counted (connections, caches); the parent waited for the server to
    # be idle, so a read that fails here is counted and reported, and the run goes on.
    warm, warm_errors = time.monotonic() + WARM_UP_SECONDS, 0
    while time.monotonic() < warm:
        try:
            reader.get_rows(ids(users, 100))
        except OnlineStoreError:
            warm_errors += 1
    out: dict[str, Any] = {
        "rows_one": timed(lambda: reader.get_rows(ids(users, 1)), reads),
        "frame_one": timed(lambda: reader.get_features(ids(users, 1)), reads),
        "rows_hundred": timed(lambda: reader.get_rows(ids(users, 100)), max(reads // 10, 50)),
        "frame_hundred": timed(lambda: reader.get_features(ids(users, 100)), max(reads // 10, 50)),
        "peak_rss_mib_without_replica": peak_rss_mib(),
        "warm_up_errors": warm_errors,
    }
    reader.close()

    async def replica() -> None:
        t0 = time.perf_counter()
        rep = await OnlineReplica(cfg).start(timeout=1800)
        out["replica_load_s"] = round(time.perf_counter() - t0, 2)
        out["replica_rows_one"] = timed(lambda: rep.get_rows(ids(users, 1)), reads)
        out["replica_rows_hundred"] = timed(lambda: rep.get_rows(ids(users, 100)), max(reads // 10, 50))
        out["replica_frame_one"] = timed(lambda: rep.get_features(ids(users, 1)), reads)
        out["replica_keys"] = len(rep.values)
        out["peak_rss_mib_with_replica"] = peak_rss_mib()
        await rep.close()

    asyncio.run(replica())
    return out


def in_child(kind: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"the {kind} reader failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# -- one size ---------------------------------------------------------------------------------------------


def a_run(cfg: Settings, store: FeatureStore, root: Path, users: int) -> dict[str, Any]:
    """A sensor interval at 1 000 events/s: 5 000 events applied and their rows written to the KV, as a run
    does (3 times, nothing else in this process); then 3 more with a replica here, for how soon it sees them."""
    staging = FolderStaging(root / "staging")
    applies, syncs, floors, fresh = [], [], [], []

    def one(rep: int) -> tuple[float, float, int]:
        manifest = staging.stage(make_batch(5000, users, 10_000_000 * (rep + 1), f"s{users}-{rep}"))
        writer = Writer(cfg, store)  # as a run calls it: right after the commit, on the store's connection
        t0 = time.perf_counter()
        result = store.apply_batch(
            staging.path(manifest.batch_id), manifest.batch_id, consistency_every=1e9, after_commit=writer
        )
        took = time.perf_counter() - t0
        assert writer.result is not None and result.users_touched
        return took - writer.result.seconds, writer.result.seconds, writer.result.written

    for rep in range(3):
        applied, wrote, written = one(rep)
        floor = bare_floor(cfg.nats_url, kv.bucket_for(cfg.durable_prefix), users, written)
        applies.append(applied)
        syncs.append(wrote)
        floors.append(floor)
        log(
            f"  run {rep + 1}: apply {applied:.3f} s, KV write {wrote:.3f} s ({written} rows; bare floor {floor:.3f} s)"
        )

    async def watched() -> None:
        replica = await OnlineReplica(cfg).start(timeout=1800)
        loop = asyncio.get_running_loop()
        for rep in range(3, 6):
            await loop.run_in_executor(None, one, rep)  # off the loop: the replica keeps taking updates meanwhile
            done = time.perf_counter()
            user = _last_user(store)
            want = (store.user_features(user) or {})["updated_at"]
            while (row := replica.get_rows([user])[0]) is None or datetime.fromisoformat(row["updated_at"]) < want:
                await asyncio.sleep(0.0005)
            fresh.append(time.perf_counter() - done)
            log(f"  run {rep + 1}: the replica here had its rows {fresh[-1] * 1000:.1f} ms after the run")
        await replica.close()

    asyncio.run(watched())
    return {
        "apply_s": round(statistics.median(applies), 3),
        "kv_write_s": round(statistics.median(syncs), 3),
        "write_share": round(statistics.median(syncs) / statistics.median(applies), 3),
        "bare_floor_s": round(statistics.median(floors), 3),
        "bare_floor_share": round(statistics.median(floors) / statistics.median(applies), 3),
        "replica_fresh_s": round(max(fresh), 4),
    }


def bare_floor(url: str, bucket: str, users: int, rows: int) -> float:
    """The server's share of a run's write, without this project's code: plain nats-py publishes of `rows`
    values (the size of a real one) to random existing keys of the same bucket, then one acked publish, as
    `put_many` does. What no client-side change can go under."""

    async def go() -> float:
        nc = await nats.connect(url)
        js = nc.jetstream()
        value = (await js.get_last_msg(kv.stream_of(bucket), kv.subject_of(bucket, kv.key_for("u-0")))).data or b""
        subjects = [kv.subject_of(bucket, kv.key_for(u)) for u in ids(users, rows)]
        t0 = time.perf_counter()
        for subject in subjects:
            await nc.publish(subject, value)
        await js.publish(kv.subject_of(bucket, kv.SYNC_KEY), b"bare")
        took = time.perf_counter() - t0
        await nc.close()
        return took

    return asyncio.run(go())


def _last_user(store: FeatureStore) -> str:
    """A user the last run rewrote (the newest updated_at)."""
    con = store.connect(read_only=True)
    try:
        row = con.execute("SELECT user_id FROM user_features ORDER BY updated_at DESC LIMIT 1").fetchone()
        return str(row[0]) if row else ""
    finally:
        con.close()


def one_size(users: int, reads: int, work: Path) -> dict[str, Any]:
    root = work / f"u{users}"
    root.mkdir(parents=True)
    nats = LocalNats(root / "nats").start()
    try:
        cfg = from_raw({"nats_url": nats.url, "durable_prefix": "bench", "feature_store_path": str(root / "s.duckdb")})
        store = FeatureStore(cfg.feature_store_path)
        t0 = time.perf_counter()
        fill(store, users)
        log(f"{users:,} users: filled in {time.perf_counter() - t0:.1f} s")
        load = sync(cfg, store)
        out: dict[str, Any] = {
            "users": users,
            "bulk_write_s": load.seconds,
            "bulk_write_rows_per_s": round(load.written / load.seconds),
        }
        log(f"  bulk KV write: {load.written:,} rows in {load.seconds:.1f} s")
        out["server_busy_after_load_s"] = until_idle(nats)
        log(f"  nats-server idle {out['server_busy_after_load_s']} s after the bulk write")
        if users <= PARQUET_MAX_USERS:
            path = root / "export.parquet"
            t0 = time.perf_counter()
            store.export(path)
            out["parquet_write_s"] = round(time.perf_counter() - t0, 3)  # what every run cost on main
            out["parquet"] = in_child("parquet", str(path), str(users), str(reads))
            log(f"  parquet reader: {out['parquet']}")
        out["kv"] = in_child("kv", nats.url, str(users), str(reads))
        log(f"  KV reader: {out['kv']}")
        out["run"] = a_run(cfg, store, root, users)
        return out
    finally:
        nats.kill()


# -- the table and the targets ----------------------------------------------------------------------------


def table(sizes: list[dict[str, Any]]) -> str:
    def ms(d: dict[str, Any] | None, key: str) -> str:
        return "-" if d is None else f"{d[key]['p50_ms']:.2f} / {d[key]['p99_ms']:.2f}"

    head = (
        "| users | Parquet reader load | Parquet 1 user p50/p99 ms | Parquet 100 | KV 1 user (DataFrame) | "
        "KV 100 (DataFrame) | KV 1 (rows) | KV 100 (rows) | replica 1 (rows) | replica 100 (rows) | "
        "replica 1 (DataFrame) | reader RSS MiB (no replica / replica) | bulk KV write rows/s | per run: apply s / "
        "KV write s (share) | bare nats-py floor s (share) | replica fresh after |\n" + "|---" * 16 + "|"
    )
    lines = [head]
    for s in sizes:
        p, k, r = s.get("parquet"), s["kv"], s["run"]
        lines.append(
            f"| {s['users']:,} | {p['load_s'] if p else '-'} s | {ms(p, 'one')} | {ms(p, 'hundred')} | "
            f"{ms(k, 'frame_one')} | {ms(k, 'frame_hundred')} | {ms(k, 'rows_one')} | {ms(k, 'rows_hundred')} | "
            f"{ms(k, 'replica_rows_one')} | {ms(k, 'replica_rows_hundred')} | {ms(k, 'replica_frame_one')} | "
            f"{k['peak_rss_mib_without_replica']} / {k['peak_rss_mib_with_replica']} | "
            f"{s['bulk_write_rows_per_s']:,} | {r['apply_s']} / {r['kv_write_s']} ({r['write_share']:.0%}) | "
            f"{r['bare_floor_s']} ({r['bare_floor_share']:.0%}) | "
            f"{r['replica_fresh_s'] * 1000:.0f} ms |"
        )
    return "\n".join(lines)


def missed(sizes: list[dict[str, Any]]) -> list[str]:
    t, out = TARGETS, []
    for s in sizes:
        k, n = s["kv"], f"{s['users']:,} users"
        checks = [
            ("KV 1 user p50", k["frame_one"]["p50_ms"], t["kv_1_p50_ms"]),
            ("KV 1 user p99", k["frame_one"]["p99_ms"], t["kv_1_p99_ms"]),
            ("KV 100 users p50", k["frame_hundred"]["p50_ms"], t["kv_100_p50_ms"]),
            ("KV 100 users p99", k["frame_hundred"]["p99_ms"], t["kv_100_p99_ms"]),
            ("replica 1 user p99 (rows)", k["replica_rows_one"]["p99_ms"], t["replica_1_p99_ms"]),
            ("replica 100 users p99 (rows)", k["replica_rows_hundred"]["p99_ms"], t["replica_100_p99_ms"]),
            ("KV write share of a run", s["run"]["write_share"], t["write_share"]),
            ("replica freshness s", s["run"]["replica_fresh_s"], t["fresh_s"]),
        ]
        out += [f"{n}: {name} {got} > {limit}" for name, got, limit in checks if got > limit]
    if len(sizes) > 1:
        lo, hi = sizes[0]["kv"], sizes[-1]["kv"]
        for key in ("frame_one", "frame_hundred"):
            ratio = hi[key]["p50_ms"] / lo[key]["p50_ms"]
            if ratio > t["flat_ratio"]:
                out.append(f"{key} p50 grew {ratio:.2f} x from {sizes[0]['users']:,} to {sizes[-1]['users']:,} users")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--reads", type=int, default=2000, help="calls per 1-user figure (a tenth for 100 users)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "parquet":
            result = child_parquet(rest[0], int(rest[1]), int(rest[2]))
        else:
            result = child_kv(from_raw({"nats_url": rest[0], "durable_prefix": "bench"}), int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return 0
    started = datetime.now(UTC)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"serving-{started:%Y%m%d-%H%M%S}.json"
    sizes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        for n in args.users:  # written after each size, so a later size that fails keeps the earlier ones
            sizes.append(one_size(n, args.reads, Path(tmp)))
            problems = missed(sizes)
            out.write_text(json.dumps({"started": started.isoformat(), "sizes": sizes, "missed": problems}, indent=2))
    print(table(sizes))
    print(f"wrote {out}")
    for p in problems:
        print(f"MISSED: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
