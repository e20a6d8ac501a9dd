"""Baseline: the naive per-message consumer the pipeline is meant to beat.

For each message: `feature_pipeline.envelopes.validate`, upsert that user's counter row in DuckDB
(autocommit: one commit per event), ack. Bounded to `limit` events; its own durable consumers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import duckdb
import nats.errors
from common import DATA_STREAMS, add_pull_consumer, connect, log

from feature_pipeline.envelopes import PoisonMessage, validate


async def per_message(url: str, db_path: Path, limit: int, deadline: float) -> dict[str, Any]:
    con = duckdb.connect(str(db_path))
    con.execute("CREATE TABLE IF NOT EXISTS user_counts (user_id VARCHAR PRIMARY KEY, n BIGINT NOT NULL)")
    nc = await connect(url, "bench-baseline")
    js = nc.jetstream(timeout=10)
    durable = "bench-baseline"
    n = poison = 0
    timed_out = False
    try:
        subs = {}
        for s in DATA_STREAMS:
            await add_pull_consumer(js, s, durable, max_ack_pending=1000)
            subs[s] = await js.pull_subscribe_bind(durable=durable, stream=s)
        t0 = time.perf_counter()
        i = 0
        while n < limit:
            if time.monotonic() > deadline:
                timed_out = True
                break
            sub = subs[DATA_STREAMS[i % 2]]  # alternate streams, like a mixed feed
            i += 1
            try:
                msgs = await sub.fetch(min(50, limit - n), timeout=2.0)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                try:
                    ev = validate(m.subject, m.data)
                except PoisonMessage:
                    poison += 1
                    await m.term()
                    continue
                con.execute(
                    "INSERT INTO user_counts VALUES ($u, 1) ON CONFLICT (user_id) DO UPDATE SET n = n + 1",
                    {"u": ev.user_id},
                )
                await m.ack()
                n += 1
        await nc.flush(timeout=10)
        elapsed = time.perf_counter() - t0
        for s in DATA_STREAMS:
            await js.delete_consumer(s, durable)
    finally:
        await nc.close()
        con.close()
    return {
        "events": n,
        "poison": poison,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed, 1),
        "timed_out": timed_out,
    }


def run(url: str, db_path: Path, limit: int, timeout: float) -> dict[str, Any]:
    log(f"baseline: per-message validate + DuckDB upsert/commit + ack, {limit} events")
    r = asyncio.run(per_message(url, db_path, limit, time.monotonic() + timeout))
    log(f"  {r['events']} events in {r['seconds']} s = {r['events_per_s']:.0f} events/s")
    return r
