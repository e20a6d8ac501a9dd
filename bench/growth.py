"""Growth: what one 100 000-event batch costs, and what the store's reads cost, as the history grows.

For each size (1 M, 10 M, 100 M stored events by default) a fresh store is filled with DuckDB SQL, not
through the pipeline: a history at a steady rate (1 M events per 30 days, both streams, 100 000 users),
appended in time order as the pipeline appends it, so 100 M events reach about eight years back. The
store's own migration then indexes the ids and one full recomputation sets the clock. The same kind of
100 000-event batch is then staged the way the sensor stages it (synthetic `Delivery` objects through
`FolderStaging.stage`) and applied with `FeatureStore.apply_batch`. Each size runs in its own process, so its peak RSS is its own. At the largest size the point-in-time training set and the
daily snapshot are timed too.

    .venv/bin/python bench/growth.py                                   # 1 M, 10 M, 100 M (about 40 min)
    .venv/bin/python bench/growth.py --sizes 1000000 10000000 --training-labels 100000

Prints the table, writes bench/results/growth-<time>.json, exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
from common import EventMaker, log

from feature_pipeline import training_set
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.ingest.staging import FolderStaging
from feature_pipeline.store.feature_store import FeatureStore

RESULTS = Path(__file__).resolve().parent / "results"
EVENTS_PER_DAY = 1_000_000 / 30
TARGETS = {"apply_ratio": 1.3, "training_seconds": 120.0, "training_rss_gib": 8.0, "snapshot_seconds": 60.0}

# One stream's history: row i of n occurred at $start + i * $step, in that order.
_HISTORY_SQL = """
INSERT INTO {table}
SELECT '{tag}-' || i,
       [{subjects}][(i % 3) + 1],
       i + 1,
       CAST($start AS TIMESTAMPTZ) + to_microseconds(CAST(i * $step_us AS BIGINT)),
       CAST($start AS TIMESTAMPTZ) + to_microseconds(CAST(i * $step_us AS BIGINT)),
       CAST($start AS TIMESTAMPTZ) + to_microseconds(CAST(i * $step_us AS BIGINT)),
       'u-' || ((i * {mix}) % $users),
       [{types}][(i % 3) + 1],
       1,
       {data},
       true,
       'prefill'
FROM range($n) t(i)
"""
_SIGNALS = {
    "table": "signal_events",
    "tag": "pre-s",
    "mix": 2654435761,
    "subjects": "'signals.task.synced', 'signals.task.completed', 'signals.session.started'",
    "types": "'task.synced', 'task.completed', 'session.started'",
    "data": 'CASE i % 3 WHEN 0 THEN \'{"provider":"todoist","tasks_total":\' || (i % 40) || '
    "',\"tasks_completed\":' || (i % 7) || '}' WHEN 1 THEN '{\"task_id\":\"task-' || (i % 10000) || '\"}' "
    "ELSE '{}' END",
}
_FEEDBACK = {
    "table": "feedback_events",
    "tag": "pre-f",
    "mix": 40503,
    "subjects": "'feedback.recommendation.shown', 'feedback.recommendation.accepted', "
    "'feedback.recommendation.dismissed'",
    "types": "'recommendation.shown', 'recommendation.accepted', 'recommendation.dismissed'",
    "data": '\'{"recommendation_id":"rec-\' || i || \'","item_id":"item-\' || (i % 500) || \'"}\'',
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fill_history(con: duckdb.DuckDBPyConnection, events: int, users: int, now: datetime) -> timedelta:
    """`events` raw rows over both streams, in time order, ending at `now`; returns the span."""
    span = timedelta(days=events / EVENTS_PER_DAY)
    for spec, n in ((_SIGNALS, events // 2), (_FEEDBACK, events - events // 2)):
        step_us = span.total_seconds() * 1e6 / n
        con.execute(_HISTORY_SQL.format(**spec), {"start": now - span, "step_us": step_us, "users": users, "n": n})
    con.execute("CHECKPOINT")
    return span


def prefill(store: FeatureStore, events: int, users: int, now: datetime) -> dict[str, Any]:
    """The raw tables, then the ids indexed and the features computed, as a store upgraded in place would."""
    t0 = time.perf_counter()
    con = store.connect()
    try:
        span = fill_history(con, events, users, now)
    finally:
        con.close()
    t1 = time.perf_counter()
    store.connect().close()  # a writer's connect indexes the ids of a store made without event_index
    t2 = time.perf_counter()
    refresh, _ = store.recompute_all(consistency_sample=1)
    t3 = time.perf_counter()
    return {
        "history_days": round(span.total_seconds() / 86400),
        "raw_insert_s": round(t1 - t0, 1),
        "index_ids_s": round(t2 - t1, 1),
        "features_rebuild_s": round(t3 - t2, 1),
        "user_features_rows": refresh.rows_written,
    }


def make_batch(n: int, users: int, first_seq: int, tag: str) -> list[Delivery]:
    maker = EventMaker(users, seed=zlib.crc32(tag.encode()))
    now = datetime.now(UTC)
    out = []
    seqs = {"SIGNALS": first_seq, "FEEDBACK": first_seq}
    for i in range(n):
        subject, body = maker.make(f"{tag}-{i}", now)
        stream = "SIGNALS" if subject.startswith("signals.") else "FEEDBACK"
        seqs[stream] += 1
        seq = seqs[stream]
        ns = time.time_ns()
        reply = f"$JS.ACK.{stream}.bench.1.{seq}.{seq}.{ns}.0"
        out.append(Delivery(stream, subject, reply, body, {"Nats-Msg-Id": f"{tag}-{i}"}, seq, 1, ns))
    return out


def apply_batches(store: FeatureStore, root: Path, events: int, batch: int, users: int, reps: int) -> dict[str, Any]:
    staging = FolderStaging(root / "staging")
    applies = []
    for rep in range(reps):
        deliveries = make_batch(batch, users, events + rep * batch, f"g{events}-{rep}")
        manifest = staging.stage(deliveries)
        t0 = time.perf_counter()
        # The comparison with the whole-history reference is rate-limited in the pipeline (every 300 s by
        # default); it is timed separately below, not inside each batch.
        result = store.apply_batch(staging.path(manifest.batch_id), manifest.batch_id, consistency_every=1e9)
        applies.append(time.perf_counter() - t0)
        staging.remove(manifest.batch_id)
        assert result.events_in_batch == batch, result
        log(f"  batch {rep + 1}/{reps}: apply_batch {applies[-1]:.2f} s ({result.users_touched} users touched)")
    return {
        "apply_seconds": [round(x, 3) for x in applies],
        "apply_seconds_median": round(statistics.median(applies), 3),
        "users_touched": result.users_touched,
    }


def phase(name: str, root: Path, events: int, batch: int, users: int, reps: int, labels: int) -> dict[str, Any]:
    """One phase at one size, in this process: its peak RSS is the phase's own."""
    store = FeatureStore(root / "store.duckdb")
    now = datetime.fromisoformat((root / "now").read_text()) if name != "prefill" else datetime.now(UTC)
    if name == "prefill":
        root.mkdir(parents=True, exist_ok=True)
        (root / "now").write_text(now.isoformat())
        out = {"prefill": prefill(store, events, users, now)}
        log(f"  prefill {out['prefill']}")
    elif name == "apply":
        out = apply_batches(store, root, events, batch, users, reps)
        out["db_bytes_per_event"] = round((root / "store.duckdb").stat().st_size / (events + reps * batch), 1)
        t0 = time.perf_counter()
        store.advance(consistency_sample=1000)  # the window schedule's run, which also compares 1 000 rows
        out["consistency_check_s"] = round(time.perf_counter() - t0, 2)
    else:
        out = reads(store, root, now, users, labels)
    out[f"{name}_peak_rss_gib"] = round(peak_rss_gib(), 2)
    return out


def reads(store: FeatureStore, root: Path, now: datetime, users: int, labels: int) -> dict[str, Any]:
    """The daily snapshot of yesterday and a point-in-time training set over the last 30 days."""
    t0 = time.perf_counter()
    rows = store.snapshot((now - timedelta(days=1)).date())
    snapshot_s = time.perf_counter() - t0
    log(f"  snapshot of yesterday: {rows:,} rows in {snapshot_s:.1f} s")
    path = root / "labels.parquet"
    con = duckdb.connect()
    con.execute(
        f"COPY (SELECT 'u-' || ((i * 7) % $users) AS user_id, "
        f"CAST($now AS TIMESTAMPTZ) - to_seconds((i * 104729) % 2592000) AS ts, i % 2 AS clicked "
        f"FROM range($n) t(i)) TO '{path}' (FORMAT parquet)",
        {"users": users, "now": now, "n": labels},
    )
    con.close()
    rss0 = peak_rss_gib()
    t1 = time.perf_counter()
    table = training_set(path, store=store)
    training_s = time.perf_counter() - t1
    assert table.num_rows == labels, table.num_rows
    log(f"  training set: {labels:,} labels in {training_s:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")
    return {
        "snapshot_rows": rows,
        "snapshot_seconds": round(snapshot_s, 1),
        "training_labels": labels,
        "training_seconds": round(training_s, 1),
        "training_peak_rss_gib": round(peak_rss_gib(), 2),
        "peak_rss_before_training_gib": round(rss0, 2),  # the snapshot's
    }


def run(root: Path, sizes: list[int], batch: int, users: int, reps: int, labels: int = 0) -> dict[str, Any]:
    """Each size, and each phase of it (prefill, apply, reads at the largest), in its own process."""
    out: dict[str, Any] = {"sizes": []}
    for n in sizes:
        log(f"growth: {n:,} stored events over {users:,} users")
        size: dict[str, Any] = {"stored_events": n, "batch_events": batch}
        phases = ["prefill", "apply", *(["reads"] if labels and n == max(sizes) else [])]
        for name in phases:
            result = root / f"{n}-{name}.json"
            cmd = [sys.executable, __file__, "--phase", name, "--one-size", str(n), "--batch", str(batch)]
            cmd += ["--users", str(users), "--reps", str(reps), "--training-labels", str(labels)]
            cmd += ["--root", str(root / str(n)), "--out", str(result)]
            subprocess.run(cmd, check=True)
            size.update(json.loads(result.read_text()))
        out["sizes"].append(size)
        shutil.rmtree(root / str(n), ignore_errors=True)
    first, last = out["sizes"][0], out["sizes"][-1]
    out["ratio_largest_over_smallest"] = round(last["apply_seconds_median"] / first["apply_seconds_median"], 2)
    return out


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(figure, value, target, met) for every target the run measured."""
    last = r["sizes"][-1]
    small = r["sizes"][0]["stored_events"]
    rows = [
        (
            f"apply_batch at {last['stored_events']:,} / at {small:,} stored",
            f"{r['ratio_largest_over_smallest']} x",
            f"<= {TARGETS['apply_ratio']} x",
            r["ratio_largest_over_smallest"] <= TARGETS["apply_ratio"],
        )
    ]
    if last.get("training_labels"):
        lab = f"{last['training_labels']:,} labels x {last['stored_events']:,} events"
        rows += [
            (
                f"training set, {lab}",
                f"{last['training_seconds']} s",
                f"< {TARGETS['training_seconds']:.0f} s",
                last["training_seconds"] < TARGETS["training_seconds"],
            ),
            (
                f"training set peak RSS, {lab}",
                f"{last['training_peak_rss_gib']} GiB",
                f"<= {TARGETS['training_rss_gib']:.0f} GiB",
                last["training_peak_rss_gib"] <= TARGETS["training_rss_gib"],
            ),
            (
                f"daily snapshot at {last['stored_events']:,}",
                f"{last['snapshot_seconds']} s",
                f"< {TARGETS['snapshot_seconds']:.0f} s",
                last["snapshot_seconds"] < TARGETS["snapshot_seconds"],
            ),
        ]
    return rows


def print_table(r: dict[str, Any]) -> None:
    print(
        "\n| stored events | history | apply_batch(100 000) median | apply peak RSS | bytes/event | "
        "whole-history comparison | prefill (raw + index ids + rebuild), its peak RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in r["sizes"]:
        pre = s["prefill"]
        print(
            f"| {s['stored_events']:,} | {pre['history_days']} d | {s['apply_seconds_median']} s | "
            f"{s['apply_peak_rss_gib']} GiB | {s['db_bytes_per_event']} | {s['consistency_check_s']} s | "
            f"{pre['raw_insert_s']} + {pre['index_ids_s']} + {pre['features_rebuild_s']} s, "
            f"{s['prefill_peak_rss_gib']} GiB |"
        )
    print("\n| figure | value | target | |\n|---|---|---|---|")
    for name, value, target, met in verdicts(r):
        print(f"| {name} | {value} | {target} | {'PASS' if met else 'FAIL'} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--training-labels", type=int, default=1_000_000)
    ap.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=["prefill", "apply", "reads"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one_size:
        result = phase(a.phase, a.root, a.one_size, a.batch, a.users, a.reps, a.training_labels)
        a.out.write_text(json.dumps(result))
        return 0
    root = Path(tempfile.mkdtemp(prefix="fp-bench-growth-"))
    try:
        r = run(root, sorted(a.sizes), a.batch, a.users, a.reps, a.training_labels)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    r["machine"] = {"nproc": os.cpu_count(), "load_average": os.getloadavg()[0]}
    print_table(r)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"growth-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, **r}, indent=2))
    print(f"\nwrote {out}")
    return 0 if all(met for *_, met in verdicts(r)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
