"""Point-in-time training join: N label rows against M stored events, timed end to end.

Issue 5's target: 1 M labels against 10 M events in under 30 s on 2 cores. The raw tables are
filled with DuckDB SQL (growth.py's history: 1 M events per 30 days over U users); labels are random
(user, ts) pairs over the same 30 days with a label column, written to Parquet; then
`feature_pipeline.training_set(labels.parquet)` reads them, computes every registry feature at
each ts and returns an Arrow table, which is written to Parquet. Run:

    .venv/bin/python bench/training.py                      # 1 M labels x 10 M events
    .venv/bin/python bench/training.py --labels 100000 --events 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from growth import fill_history

from feature_pipeline import training_set
from feature_pipeline.read.training import write_table
from feature_pipeline.store.feature_store import FeatureStore

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SECONDS = 30.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--received-cutoff", action="store_true", help="also time the received_at <= ts variant")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fp-bench-training-"))
    try:
        store = FeatureStore(root / "store.duckdb")
        now = datetime.now(UTC)
        t0 = time.perf_counter()
        con = store.connect()
        fill_history(con, args.events, args.users, now)
        labels = root / "labels.parquet"
        con.execute(
            f"COPY (SELECT 'u-' || ((i * 7) % $users) AS user_id, "
            f"CAST($now AS TIMESTAMPTZ) - to_seconds((i * 104729) % 2592000) AS ts, i % 2 AS clicked "
            f"FROM range($n) t(i)) TO '{labels}' (FORMAT parquet)",
            {"users": args.users, "now": now, "n": args.labels},
        )
        con.execute("CHECKPOINT")
        con.close()
        setup = time.perf_counter() - t0
        print(f"setup: {args.events:,} events over {args.users:,} users, {args.labels:,} labels in {setup:.1f} s")

        rows = []
        for cutoff in [False, True] if args.received_cutoff else [False]:
            t1 = time.perf_counter()
            table = training_set(labels, store=store, received_cutoff=cutoff)
            t2 = time.perf_counter()
            write_table(table, root / "train.parquet")
            t3 = time.perf_counter()
            assert table.num_rows == args.labels, table.num_rows
            rows.append(
                {
                    "received_cutoff": cutoff,
                    "join_seconds": round(t2 - t1, 2),
                    "write_seconds": round(t3 - t2, 2),
                    "total_seconds": round(t3 - t1, 2),
                    "labels_per_second": round(args.labels / (t3 - t1)),
                    "columns": table.num_columns,
                }
            )
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\nmachine: nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; peak RSS {peak_mib:,.0f} MiB")
        print(
            f"| labels x events | received_cutoff | join s | write s | total s | labels/s | target < {TARGET_SECONDS:.0f} s |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            verdict = "PASS" if r["total_seconds"] < TARGET_SECONDS else "FAIL"
            print(
                f"| {args.labels:,} x {args.events:,} | {r['received_cutoff']} | {r['join_seconds']} | "
                f"{r['write_seconds']} | {r['total_seconds']} | {r['labels_per_second']:,} | {verdict} |"
            )
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"training-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(
            json.dumps({"args": vars(args), "setup_seconds": setup, "peak_rss_mib": peak_mib, "runs": rows}, indent=2)
        )
        print(f"\nwrote {out}")
        return 0 if all(r["total_seconds"] < TARGET_SECONDS for r in rows) else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
