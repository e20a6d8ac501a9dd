"""Ceiling: how fast a bare nats-py loop drains the same backlog with no processing at all.

(a) `PullSubscription.fetch(batch)` + `await msg.ack()` per message;
(b) a raw pull: publish `{"batch": N, "no_wait": true}` to `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`
    with a core inbox subscription, then `+ACK` published to every reply subject and one flush.
Each uses its own durable consumer on SIGNALS and FEEDBACK (the pipeline's durables are untouched),
so both loops see exactly the backlog the pipeline will drain afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats.errors
from common import DATA_STREAMS, add_pull_consumer, connect, log


def _result(n: int, elapsed: float, batch: int, timed_out: bool) -> dict[str, Any]:
    return {
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed, 1),
        "batch": batch,
        "timed_out": timed_out,
    }


async def fetch_loop(url: str, batch: int, deadline: float) -> dict[str, Any]:
    nc = await connect(url, "bench-ceiling-fetch")
    js = nc.jetstream(timeout=10)
    durable = "bench-ceiling-fetch"
    n = 0
    try:
        expected = {s: (await js.stream_info(s)).state.messages for s in DATA_STREAMS}
        subs = {}
        for s in DATA_STREAMS:
            await add_pull_consumer(js, s, durable, max_ack_pending=batch * 8)
            subs[s] = await js.pull_subscribe_bind(durable=durable, stream=s)
        t0 = time.perf_counter()
        timed_out = False
        for s in DATA_STREAMS:
            got = 0
            while got < expected[s]:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                try:
                    msgs = await subs[s].fetch(batch, timeout=2.0)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    await m.ack()
                got += len(msgs)
            n += got
            if timed_out:
                break
        await nc.flush(timeout=30)
        elapsed = time.perf_counter() - t0
        for s in DATA_STREAMS:
            await js.delete_consumer(s, durable)
    finally:
        await nc.close()
    return _result(n, elapsed, batch, timed_out)


async def raw_loop(url: str, batch: int, deadline: float) -> dict[str, Any]:
    nc = await connect(url, "bench-ceiling-raw")
    js = nc.jetstream(timeout=10)
    durable = "bench-ceiling-raw"
    n = 0
    replies: list[str] = []
    done = asyncio.Event()
    want = 0

    async def on_msg(msg: Any) -> None:
        if msg.reply:
            replies.append(msg.reply)
            if len(replies) >= want:
                done.set()
        elif msg.headers and msg.headers.get("Status") != "100":  # 404/408/409 end the request
            done.set()

    try:
        expected = {s: (await js.stream_info(s)).state.messages for s in DATA_STREAMS}
        for s in DATA_STREAMS:
            await add_pull_consumer(js, s, durable, max_ack_pending=batch * 8)
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=batch * 2 + 1000, pending_bytes_limit=1 << 30)
        t0 = time.perf_counter()
        timed_out = False
        for s in DATA_STREAMS:
            got = 0
            request = json.dumps({"batch": batch, "no_wait": True}).encode()
            while got < expected[s]:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                replies.clear()
                done.clear()
                want = batch
                await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{s}.{durable}", request, reply=inbox)
                await asyncio.wait_for(done.wait(), 30)
                for r in replies:
                    await nc.publish(r, b"+ACK")
                await nc.flush(timeout=30)
                got += len(replies)
            n += got
            if timed_out:
                break
        elapsed = time.perf_counter() - t0
        for s in DATA_STREAMS:
            await js.delete_consumer(s, durable)
    finally:
        await nc.close()
    return _result(n, elapsed, batch, timed_out)


def run(url: str, fetch_batch: int, raw_batch: int, timeout: float) -> dict[str, Any]:
    log(f"ceiling (a): fetch({fetch_batch}) + per-message ack")
    a = asyncio.run(fetch_loop(url, fetch_batch, time.monotonic() + timeout))
    log(f"  {a['events']} events in {a['seconds']} s = {a['events_per_s']:.0f} events/s")
    log(f"ceiling (b): raw MSG.NEXT batch={raw_batch} no_wait + acks + one flush")
    b = asyncio.run(raw_loop(url, raw_batch, time.monotonic() + timeout))
    log(f"  {b['events']} events in {b['seconds']} s = {b['events_per_s']:.0f} events/s")
    return {"fetch": a, "raw": b}
