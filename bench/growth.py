"""Growth: the cost of `FeatureStore.apply_batch` for one staged batch when the raw tables are small vs large.

The raw tables are pre-filled with DuckDB SQL (INSERT ... SELECT FROM range()), not through the pipeline;
user_features is then rebuilt from them with the pipeline's own feature SQL. The batch is staged the way the
sensor stages it: synthetic `Delivery` objects (as in feature_pipeline_tests/test_store.py) through
`ingest.assemble.assemble` and `FolderStaging.stage`.
"""

from __future__ import annotations

import shutil
import statistics
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import EventMaker, log

from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.ingest.assemble import assemble
from feature_pipeline.ingest.staging import FolderStaging
from feature_pipeline.store.feature_store import FeatureStore

_SIGNALS_SQL = """
INSERT INTO signal_events
SELECT 'pre-s-' || i,
       ['signals.task.synced', 'signals.task.completed', 'signals.session.started'][(i % 3) + 1],
       i + 1,
       $now - to_seconds((i * 7919) % 2592000),
       $now - to_seconds((i * 7919) % 2592000),
       $now,
       'u-' || ((i * 2654435761) % $users),
       ['task.synced', 'task.completed', 'session.started'][(i % 3) + 1],
       1,
       CASE i % 3
           WHEN 0 THEN '{"provider":"todoist","tasks_total":' || (i % 40) || ',"tasks_completed":' || (i % 7) || '}'
           WHEN 1 THEN '{"task_id":"task-' || (i % 10000) || '"}'
           ELSE '{}' END,
       true,
       'prefill'
FROM range($n) t(i)
"""
_FEEDBACK_SQL = """
INSERT INTO feedback_events
SELECT 'pre-f-' || i,
       ['feedback.recommendation.shown', 'feedback.recommendation.accepted',
        'feedback.recommendation.dismissed'][(i % 3) + 1],
       i + 1,
       $now - to_seconds((i * 7919) % 2592000),
       $now - to_seconds((i * 7919) % 2592000),
       $now,
       'u-' || ((i * 40503) % $users),
       ['recommendation.shown', 'recommendation.accepted', 'recommendation.dismissed'][(i % 3) + 1],
       1,
       '{"recommendation_id":"rec-' || i || '","item_id":"item-' || (i % 500) || '"}',
       true,
       'prefill'
FROM range($n) t(i)
"""


def prefill(store: FeatureStore, events: int, users: int) -> dict[str, float]:
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    con = store.connect()
    try:
        n_sig = events // 2
        con.execute(_SIGNALS_SQL, {"now": now, "users": users, "n": n_sig})
        con.execute(_FEEDBACK_SQL, {"now": now, "users": users, "n": events - n_sig})
        con.execute("CHECKPOINT")
    finally:
        con.close()
    t1 = time.perf_counter()
    refresh, _ = store.recompute_all(consistency_sample=1)  # also sets the clock, so batches are incremental
    rows = refresh.rows_written
    t2 = time.perf_counter()
    return {"raw_insert_s": round(t1 - t0, 2), "features_rebuild_s": round(t2 - t1, 2), "user_features_rows": rows}


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


def one_size(root: Path, events: int, batch: int, users: int, reps: int) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    # With the serving copy, as in the pipeline: every apply_batch also republishes it.
    store = FeatureStore(root / "store.duckdb", serving_path=root / "serving" / "user_features.parquet")
    log(f"growth: pre-filling {events} events over {users} users")
    pre = prefill(store, events, users)
    log(f"  raw insert {pre['raw_insert_s']} s, features rebuild {pre['features_rebuild_s']} s")
    staging = FolderStaging(root / "staging")
    applies, assembles, stages = [], [], []
    for rep in range(reps):
        deliveries = make_batch(batch, users, events + rep * batch, f"g{events}-{rep}")
        t0 = time.perf_counter()
        assembled = assemble(deliveries)
        t1 = time.perf_counter()
        manifest = staging.stage(assembled)
        t2 = time.perf_counter()
        result = store.apply_batch(staging.path(manifest.batch_id), manifest.batch_id)
        t3 = time.perf_counter()
        staging.remove(manifest.batch_id)
        assert result.events_in_batch == batch, result
        assembles.append(t1 - t0)
        stages.append(t2 - t1)
        applies.append(t3 - t2)
        log(
            f"  batch {rep + 1}/{reps}: assemble {t1 - t0:.2f} s, stage {t2 - t1:.2f} s, apply_batch {t3 - t2:.2f} s "
            f"({result.users_touched} users touched)"
        )
    size_mb = (root / "store.duckdb").stat().st_size / 1e6
    return {
        "stored_events": events,
        "batch_events": batch,
        "prefill": pre,
        "db_mb": round(size_mb, 1),
        "apply_seconds": [round(x, 3) for x in applies],
        "apply_seconds_median": round(statistics.median(applies), 3),
        "assemble_seconds_median": round(statistics.median(assembles), 3),
        "stage_seconds_median": round(statistics.median(stages), 3),
        "users_touched": result.users_touched,
    }


def run(root: Path, small: int, large: int, batch: int, users: int, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, n in (("small", small), ("large", large)):
        out[label] = one_size(root / label, n, batch, users, reps)
        shutil.rmtree(root / label, ignore_errors=True)
    out["ratio_large_over_small"] = round(
        out["large"]["apply_seconds_median"] / out["small"]["apply_seconds_median"], 2
    )
    log(f"  apply_batch at {large} vs {small} stored events: x{out['ratio_large_over_small']}")
    return out
