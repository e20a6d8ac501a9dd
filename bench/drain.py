"""The pipeline itself: the real `dagster-daemon run -w workspace.yaml` against the bench's nats-server.

`backlog()` times a pre-published backlog from daemon start until every event is stored, featurized and
acked; `steady()` offers a fixed rate to the running pipeline and measures publish→commit latency and lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    EventMaker,
    Publisher,
    connect,
    forget_cleanup,
    lag,
    log,
    on_cleanup,
    percentile,
    slope,
    total_lag,
)

from feature_pipeline import settings, testing
from feature_pipeline.broker.local import LocalNats

# Batch and consumer knobs the bench passes through from its own environment; paths, URL and prefix are its own.
KNOBS = (
    "FEATURE_PIPELINE_BATCH_MAX_MESSAGES",
    "FEATURE_PIPELINE_BATCH_MAX_BYTES",
    "FEATURE_PIPELINE_MAX_BATCHES_IN_FLIGHT",
    "FEATURE_PIPELINE_SENSOR_INTERVAL_SECONDS",
    "FEATURE_PIPELINE_FETCH_SECONDS",
    "FEATURE_PIPELINE_NAK_DELAY_SECONDS",
    "FEATURE_PIPELINE_RUN_TIMEOUT_SECONDS",
    "NATS_MAX_DELIVER",
    "NATS_ACK_WAIT_SECONDS",
)
COUNT_SQL = "SELECT (SELECT count(*) FROM signal_events) + (SELECT count(*) FROM feedback_events)"


def knob_env() -> dict[str, str]:
    """Every knob as the bench's environment sets it, else at its default."""
    return {k: os.environ.get(k, settings.BY_NAME[k].default) for k in KNOBS}


class Pipeline(testing.Pipeline):
    """`feature_pipeline.testing.Pipeline` on the bench's nats-server (never stopped here), plus the bench's needs.

    The harness's paths, URL and prefix; the batch and consumer knobs come from the bench's own environment
    (`KNOBS`), each at its documented default when unset (the harness's test intervals are not used).
    """

    def __init__(
        self,
        root: Path,
        nats: LocalNats,
        prefix: str = "bench",
        env: dict[str, str] | None = None,
        instance_yaml: Path | None = None,
        warm: bool = False,
    ) -> None:
        """`env` and `instance_yaml`: for a deployment (deploy/dagster.yaml and its variables, see bench/deploy.py);
        `warm`: runs on the local warm worker, as `feature-pipeline up` starts them."""
        extra = {"instance_yaml": instance_yaml} if instance_yaml else {}
        super().__init__(root, {**knob_env(), **(env or {})}, nats=nats, prefix=prefix, warm=warm, **extra)
        self.started_at = 0.0
        self._cleanup: Callable[[], None] | None = None

    def settings(self) -> dict[str, str]:
        """The values in effect (validated the way the code location will), and where each came from."""
        cfg = settings.load(self.env)
        out = {}
        for name in ("NATS_URL", "NATS_DURABLE_PREFIX", *KNOBS):
            value = getattr(cfg, settings.BY_NAME[name].field)
            source = "set by bench" if name not in KNOBS else "from env" if name in os.environ else "default"
            out[name] = f"{value} ({source})"
        return out

    def batch_max(self) -> int:
        return settings.load(self.env).batch_max_messages

    def start_daemon(self) -> None:
        """The drain's clock starts here: `started_at` is when the daemon is launched."""
        self.started_at = time.time()
        super().start_daemon()
        if self._cleanup is None:
            self._cleanup = on_cleanup(self.stop)

    def stop_daemon(self) -> None:
        super().stop_daemon()
        if self.daemon is not None:
            testing.stop_group(self.daemon)  # and whatever its process group still holds (code server, run workers)

    def stop(self) -> None:
        self.close()
        if self._cleanup:
            forget_cleanup(self._cleanup)
            self._cleanup = None

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.daemon_log.read_text(errors="replace")[-chars:] if self.daemon_log.exists() else ""

    # -- Dagster's own records -------------------------------------------------------------------

    def run_and_tick_stats(self, since: float, until: float) -> dict[str, Any]:
        """Ingest runs (queue time, run time, gaps) and sensor ticks (duration) between two wall times."""
        import dagster as dg

        out: dict[str, Any] = {}
        with self.instance() as inst:
            recs = [
                r
                for r in inst.get_run_records(filters=dg.RunsFilter(job_name="ingest"))
                if since <= r.create_timestamp.timestamp() <= until
            ]
            recs.sort(key=lambda r: r.create_timestamp)
            statuses: dict[str, int] = {}
            for r in recs:
                statuses[r.dagster_run.status.value] = statuses.get(r.dagster_run.status.value, 0) + 1
            runs = [r for r in recs if r.start_time and r.end_time]
            durations = [r.end_time - r.start_time for r in runs]
            queued = [r.start_time - r.create_timestamp.timestamp() for r in runs]
            gaps = [b.start_time - a.end_time for a, b in itertools.pairwise(runs)]
            busy = sum(durations)
            span = (runs[-1].end_time - runs[0].start_time) if runs else 0
            out["runs"] = {
                "count": len(recs),
                "statuses": statuses,
                "run_seconds_median": _r(percentile(durations, 0.5)),
                "run_seconds_max": _r(max(durations) if durations else None),
                "queued_seconds_median": _r(percentile(queued, 0.5)),
                "queued_seconds_max": _r(max(queued) if queued else None),
                "gap_between_runs_seconds_median": _r(percentile(gaps, 0.5)),
                "runs_busy_share": _r(busy / span if span else None),
            }
            ticks_out: dict[str, Any] = {}
            for state in inst.all_instigator_state():
                if state.instigator_name != "ingest_sensor":
                    continue
                ticks = inst.get_ticks(state.instigator_origin_id, state.selector_id, after=since, before=until)
                secs = [
                    t.tick_data.end_timestamp - t.timestamp
                    for t in ticks
                    if getattr(t.tick_data, "end_timestamp", None)
                ]
                starts = sorted(t.timestamp for t in ticks)
                ticks_out = {
                    "count": len(ticks),
                    "tick_seconds_median": _r(percentile(secs, 0.5)),
                    "tick_seconds_max": _r(max(secs) if secs else None),
                    "interval_seconds_median": _r(percentile([b - a for a, b in itertools.pairwise(starts)], 0.5)),
                    "statuses": {
                        s: sum(1 for t in ticks if t.status.value == s) for s in {t.status.value for t in ticks}
                    },
                }
            out["sensor_ticks"] = ticks_out
        return out


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# -- backlog drain ------------------------------------------------------------------------------


def _stored(p: Pipeline) -> int:
    """Events stored, over every shard's store."""
    return sum(r[0] for r in p.query(COUNT_SQL))


async def _backlog(p: Pipeline, expected: int, timeout: float) -> dict[str, Any]:
    nc = await connect(p.nats.url, "bench-monitor")
    js = nc.jetstream(timeout=5)
    t0 = p.started_at
    timeline: list[list[Any]] = []
    first_fetch = first_ack = None
    done_at = None
    rows = 0
    last_log = 0.0
    try:
        while True:
            now = time.time()
            if now - t0 > timeout:
                break
            if not p.alive():
                code = p.daemon.returncode if p.daemon else None
                raise RuntimeError(f"dagster-daemon exited with {code}:\n{p.log_tail()}")
            lags = await lag(js, p.prefix)
            staged = len(p.staged())
            tl = total_lag(lags)
            timeline.append([round(now - t0, 2), lags["SIGNALS"], lags["FEEDBACK"], lags["DEADLETTER"], staged])
            if first_fetch is None and staged:
                first_fetch = now
            if first_ack is None and tl is not None and tl < expected:
                first_ack = now
            if now - last_log > 10:
                log(f"  +{now - t0:5.0f} s  lag {tl}  staged batches {staged}")
                last_log = now
            if tl == 0 and not lags["DEADLETTER"] and staged == 0:
                rows = await asyncio.to_thread(_stored, p)
                if rows >= expected:
                    done_at = now
                    break
            await asyncio.sleep(0.5)
    finally:
        await nc.close()
    out: dict[str, Any] = {
        "events": expected,
        "timed_out": done_at is None,
        "seconds_to_first_fetch": _r(first_fetch - t0 if first_fetch else None, 2),
        "seconds_to_first_ack": _r(first_ack - t0 if first_ack else None, 2),
        "lag_timeline": timeline,
    }
    end = done_at or time.time()
    if done_at is None:
        rows = await asyncio.to_thread(_stored, p)
    out["events_stored"] = rows
    out["seconds"] = round(end - t0, 2)
    out["events_per_s"] = round(rows / (end - t0), 1)
    if first_fetch:
        out["events_per_s_after_first_fetch"] = round(rows / max(end - first_fetch, 1e-9), 1)
    return out


def backlog(p: Pipeline, expected: int, timeout: float) -> dict[str, Any]:
    log(f"pipeline backlog drain: {expected} events, daemon started, timeout {timeout:.0f} s")
    r = asyncio.run(_backlog(p, expected, timeout))
    checks = p.query(
        "SELECT (SELECT count(*) FROM user_features), "
        "(SELECT count(DISTINCT user_id) FROM (SELECT user_id FROM signal_events UNION ALL "
        "SELECT user_id FROM feedback_events)), (SELECT count(*) FROM ingested_batches), "
        "(SELECT epoch(min(committed_at)) FROM ingested_batches), (SELECT epoch(max(committed_at)) FROM ingested_batches), "
        "(SELECT count(*) FROM dead_letters)",
    )
    if checks:  # one row per shard: users are disjoint, so the counts add up
        feat, users, batches, dead = (sum(r[i] for r in checks) for i in (0, 1, 2, 5))
        first_c = min((r[3] for r in checks if r[3]), default=None)
        last_c = max((r[4] for r in checks if r[4]), default=None)
        r.update(
            user_features_rows=feat,
            distinct_users=users,
            featurized=feat == users,
            batches=batches,
            dead_letters=dead,
            seconds_to_first_commit=_r(first_c - p.started_at if first_c else None, 2),
            seconds_to_last_commit=_r(last_c - p.started_at if last_c else None, 2),
        )
    state = "TIMED OUT" if r["timed_out"] else "done"
    log(
        f"  {state}: {r['events_stored']}/{expected} stored+acked in {r['seconds']} s = {r['events_per_s']:.0f} events/s"
    )
    return r


# -- steady state -------------------------------------------------------------------------------


async def _steady(p: Pipeline, rate: int, seconds: float, drain_timeout: float, users: int, tag: str) -> dict[str, Any]:
    pub_nc = await connect(p.nats.url, "bench-steady-producer")
    mon = await connect(p.nats.url, "bench-steady-monitor")
    pub = await Publisher(pub_nc).start()
    mjs = mon.jetstream(timeout=5)
    maker = EventMaker(users, seed=rate)
    samples: list[tuple[float, int | None]] = []
    t0 = time.monotonic()
    producing = True

    async def producer() -> None:
        total = int(rate * seconds)
        while pub.sent < total:
            el = time.monotonic() - t0
            due = total if el >= seconds else min(int(rate * el), total)
            now = datetime.now(UTC)
            while pub.sent < due:
                eid = f"{tag}-{pub.sent}"
                subject, body = maker.make(eid, now)
                await pub.publish(subject, body, eid)
            await pub.nc.flush()
            await asyncio.sleep(0.01)
        await pub.wait()

    async def sampler() -> None:
        while producing:
            tl = total_lag(await lag(mjs, p.prefix))
            samples.append((round(time.monotonic() - t0, 2), tl))
            await asyncio.sleep(1.0)

    try:
        s_task = asyncio.create_task(sampler())
        await asyncio.wait_for(producer(), seconds + 60)
        produced_s = time.monotonic() - t0
        lag_at_stop = total_lag(await lag(mjs, p.prefix))
        producing = False
        await s_task
        # Let the pipeline finish what was offered (bounded), then read the latencies from the rows.
        drained_after = None
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            if not p.alive():
                raise RuntimeError(f"dagster-daemon exited:\n{p.log_tail()}")
            tl = total_lag(await lag(mjs, p.prefix))
            if tl == 0 and not p.staged():
                drained_after = time.monotonic() - t0 - produced_s
                break
            await asyncio.sleep(0.5)
    finally:
        await pub_nc.close()
        await mon.close()

    like = f"{tag}-%"
    rows = p.query(
        "WITH d AS (SELECT date_diff('microsecond', received_at, ingested_at) / 1e6 AS s FROM signal_events "
        "WHERE event_id LIKE $p UNION ALL SELECT date_diff('microsecond', received_at, ingested_at) / 1e6 "
        "FROM feedback_events WHERE event_id LIKE $p) "
        "SELECT count(*), quantile_cont(s, 0.5), quantile_cont(s, 0.95), max(s) FROM d",
        {"p": like},
    )
    stored, p50, p95, mx = rows[0] if rows else (0, None, None, None)
    warm = min(10.0, seconds / 3)
    pts = [(t, float(v)) for t, v in samples if v is not None and t >= warm]
    lags = [v for _, v in samples if v is not None] + ([lag_at_stop] if lag_at_stop is not None else [])
    k = slope(pts)
    sent = pub.sent
    achieved = sent / produced_s
    bounded = drained_after is not None and (k is None or k <= 0.05 * achieved)
    return {
        "rate_target": rate,
        "rate_achieved": round(achieved, 1),
        "seconds": round(produced_s, 1),
        "published": sent,
        "stored": stored,
        "latency_p50_s": _r(p50, 2),
        "latency_p95_s": _r(p95, 2),
        "latency_max_s": _r(mx, 2),
        "lag_max": max(lags) if lags else None,
        "lag_at_producer_stop": lag_at_stop,
        "lag_slope_per_s": _r(k, 1),
        "drained_seconds_after_stop": _r(drained_after, 1),
        "lag_bounded": bounded,
        "lag_samples": samples,
    }


def steady(p: Pipeline, rate: int, seconds: float, drain_timeout: float, users: int) -> dict[str, Any]:
    tag = f"ss{rate}"
    log(f"steady state: {rate} events/s for {seconds:.0f} s (then up to {drain_timeout:.0f} s to drain)")
    r = asyncio.run(_steady(p, rate, seconds, drain_timeout, users, tag))
    log(
        f"  achieved {r['rate_achieved']:.0f}/s; stored {r['stored']}/{r['published']}; latency p50 {r['latency_p50_s']} "
        f"p95 {r['latency_p95_s']} max {r['latency_max_s']} s; lag max {r['lag_max']} at stop {r['lag_at_producer_stop']} "
        f"slope {r['lag_slope_per_s']}/s; drained after {r['drained_seconds_after_stop']} s"
    )
    return r


def wait_idle(p: Pipeline, timeout: float) -> bool:
    """Between phases: wait until lag is 0 and nothing is staged."""

    async def go() -> bool:
        nc = await connect(p.nats.url, "bench-idle")
        js = nc.jetstream(timeout=5)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if total_lag(await lag(js, p.prefix)) == 0 and not p.staged():
                    return True
                await asyncio.sleep(0.5)
            return False
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    return asyncio.run(go())
