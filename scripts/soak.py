"""Soak test: the real pipeline (nats-server + dagster-daemon) under a steady, messy load and random crashes.

    .venv/bin/python scripts/soak.py --minutes 30 [--seed N] [--rate 200] [--fault-every 45]

For `--minutes` a publisher sends about `--rate` events/s (valid events of every known subject for
~200 users, exact duplicates, late events, poison) while a fault injector SIGKILLs, every
~`--fault-every` s, one of: nats-server (restarted on the same store after 2-8 s), a running ingest run
worker, or the whole daemon process group (restarted after 2-5 s). Then publishing stops, the pipeline
is given (bounded) time to catch up, and the ledger of what the streams confirmed (PubAcks) is
reconciled against DuckDB: nothing lost, nothing counted twice, user_features equal to a recomputation,
lag 0, nothing left staged. Exit 0 when all of that holds, 1 when not (with the fault timeline and the
daemon log tail), 2 when the pipeline could not be started, 3 when the watchdog had to stop a hung run.

Only 127.0.0.1 is used. Every wait is bounded and every process started is killed in `finally`.
The results table is also written as JSON to scripts/soak-results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
from dagster import DagsterRunStatus

from feature_pipeline.broker import topology
from feature_pipeline.broker.client import Broker
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.samples import SAMPLE_SUBJECTS, sample_data
from feature_pipeline.store.features import inconsistent_users
from feature_pipeline.store.loader import load_registry
from feature_pipeline.streams import PACKAGED, consumer_name, with_dead_letters
from feature_pipeline.testing import Pipeline

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "soak-results"
SUBJECTS = sorted(SAMPLE_SUBJECTS)
STREAM_OF = {"signals": "SIGNALS", "feedback": "FEEDBACK"}
# NATS_MAX_DELIVER=3: a store outage of STORE_OUTAGE_SECONDS outlasts three failed runs of a batch, which
# would have dead-lettered it had runs failing outside their messages spent deliveries.
EXTRA_ENV = {"NATS_MAX_DELIVER": "3", "FEATURE_PIPELINE_RUN_TIMEOUT_SECONDS": "20"}
STORE_OUTAGE_SECONDS = 60  # the store's folder replaced by a file
STAGING_FULL_SECONDS = 45  # the staging disk (a tmpfs the soak mounts) left with 4 MiB free
STAGING_DISK_MIB = 1024

# The mix, by weight: valid events (now), late valid events, exact duplicates of a confirmed event, poison.
MIX = (("valid", 75), ("late", 10), ("dup", 10), ("poison", 5))
POISON_KINDS = ("not-json", "missing-user_id", "type-mismatch", "naive-timestamp")

PUBLISH_TIMEOUT_SECONDS = 2.0
PUBLISH_WINDOW = 64  # publishes awaited together
MAX_BUFFER_SECONDS = 120  # generation pauses when this many seconds of events wait to be confirmed
DEDUP_WINDOW_SECONDS = 120  # JetStream's default duplicate_window: a retry later than this could store twice
FINAL_PUBLISH_SECONDS = 90  # after --minutes, how long unconfirmed attempts are still retried
STABLE_SECONDS = 20
WORKER_WAIT_SECONDS = 20

_T0 = time.monotonic()
_LOG_LOCK = threading.Lock()
_LOG_FILE: Path | None = None


def log(msg: str) -> None:
    line = f"[{datetime.now().strftime('%H:%M:%S')} +{time.monotonic() - _T0:7.1f}s] {msg}"
    with _LOG_LOCK:
        print(line, flush=True)
        if _LOG_FILE is not None:
            with contextlib.suppress(OSError), open(_LOG_FILE, "a") as fh:
                fh.write(line + "\n")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the ledger: what the streams confirmed ----------------------------------------------------------


@dataclass
class Outgoing:
    """One message to publish; retried with the same Nats-Msg-Id until a PubAck confirms it."""

    kind: str  # valid | late | dup | poison
    subject: str
    body: bytes
    msg_id: str
    event_id: str | None = None  # valid, late, dup: the envelope id
    detail: str = ""  # poison: which kind
    attempts: int = 0
    first_attempt: float | None = None


@dataclass
class Confirmed:
    kind: str
    msg_id: str
    event_id: str | None
    subject: str
    stream: str
    seq: int
    detail: str
    confirmed_at: str
    attempts: int
    dedup_hit: bool  # the PubAck said duplicate: an earlier attempt of this message was already stored


@dataclass
class Ledger:
    valid: dict[str, Confirmed] = field(default_factory=dict)  # event id -> its one confirmed message
    dups: list[Confirmed] = field(default_factory=list)
    poison: list[Confirmed] = field(default_factory=list)
    by_seq: dict[tuple[str, int], str] = field(default_factory=dict)  # (stream, seq) -> msg id
    seq_collisions: list[dict[str, Any]] = field(default_factory=list)
    dedup_hits: int = 0
    retried: int = 0
    slow_confirms: list[dict[str, Any]] = field(default_factory=list)  # confirmed past the dedup window
    generated: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    unconfirmed: list[Outgoing] = field(default_factory=list)  # attempted at least once, never confirmed
    never_sent: int = 0
    skipped_backpressure: int = 0

    def confirm(self, o: Outgoing, ack: Any) -> None:
        c = Confirmed(
            kind=o.kind,
            msg_id=o.msg_id,
            event_id=o.event_id,
            subject=o.subject,
            stream=ack.stream,
            seq=int(ack.seq),
            detail=o.detail,
            confirmed_at=now_iso(),
            attempts=o.attempts,
            dedup_hit=bool(ack.duplicate),
        )
        key = (c.stream, c.seq)
        if key in self.by_seq and self.by_seq[key] != o.msg_id:
            self.seq_collisions.append({"stream": c.stream, "seq": c.seq, "first": self.by_seq[key], "now": o.msg_id})
        self.by_seq.setdefault(key, o.msg_id)
        if c.dedup_hit:
            self.dedup_hits += 1
        if o.attempts > 1:
            self.retried += 1
        if o.first_attempt is not None and time.monotonic() - o.first_attempt > DEDUP_WINDOW_SECONDS:
            self.slow_confirms.append({"msg_id": o.msg_id, "seconds": round(time.monotonic() - o.first_attempt, 1)})
        if o.kind in ("valid", "late"):
            assert o.event_id is not None
            self.valid[o.event_id] = c
        elif o.kind == "dup":
            self.dups.append(c)
        else:
            self.poison.append(c)


# -- the publisher -------------------------------------------------------------------------------------


class EventFactory:
    def __init__(self, rng: random.Random, users: int, run_tag: str) -> None:
        self.rng = rng
        self.users = [f"u-{i:03d}" for i in range(users)]
        self.tag = run_tag
        self.n = 0
        self.recent: collections.deque[tuple[str, bytes, str]] = collections.deque(maxlen=5000)
        self.kinds = [k for k, _ in MIX]
        self.weights = [w for _, w in MIX]

    def _next(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.tag}-{self.n:08d}"

    def _valid(self, late: bool) -> Outgoing:
        subject = self.rng.choice(SUBJECTS)
        event_id = self._next("evt")
        when = datetime.now(UTC)
        if late:  # hours to days in the past
            when -= timedelta(seconds=self.rng.uniform(2 * 3600, 10 * 86400))
        body = make_envelope(
            event_id, subject.split(".", 1)[1], self.rng.choice(self.users), when, sample_data(subject, self.rng)
        )
        return Outgoing("late" if late else "valid", subject, body, event_id, event_id=event_id)

    def _poison(self) -> Outgoing:
        kind = self.rng.choice(POISON_KINDS)
        pid = self._next("poison")
        subject = self.rng.choice(SUBJECTS)
        typ = subject.split(".", 1)[1]
        env: dict[str, Any] = {
            "id": pid,
            "type": typ,
            "occurred_at": now_iso(),
            "user_id": self.rng.choice(self.users),
            "schema_version": 1,
            "data": sample_data(subject, self.rng),
        }
        if kind == "not-json":
            body = b"\xff\xfe not json {" + pid.encode()
        else:
            if kind == "missing-user_id":
                del env["user_id"]
            elif kind == "type-mismatch":
                env["type"] = "task.completed" if typ != "task.completed" else "task.synced"
            else:  # naive-timestamp
                env["occurred_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
            body = json.dumps(env, separators=(",", ":")).encode()
        return Outgoing("poison", subject, body, pid, detail=kind)

    def make(self) -> Outgoing:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        if kind == "dup" and self.recent:
            subject, body, event_id = self.rng.choice(self.recent)
            return Outgoing("dup", subject, body, self._next("dup"), event_id=event_id)
        if kind == "poison":
            return self._poison()
        return self._valid(late=kind == "late")


class Publisher:
    """Generates at `rate`/s into a buffer; a sender publishes the buffer with retries until PubAck."""

    def __init__(self, url: str, rate: float, factory: EventFactory, ledger: Ledger) -> None:
        self.url = url
        self.rate = rate
        self.factory = factory
        self.ledger = ledger
        self.buffer: collections.deque[Outgoing] = collections.deque()
        self.generating = True
        self.broker: Broker | None = None
        self.outage_since: float | None = None
        self.outages: list[dict[str, Any]] = []

    async def generate(self, seconds: float) -> None:
        start = time.monotonic()
        made = 0
        max_buffer = int(self.rate * MAX_BUFFER_SECONDS)
        while (elapsed := time.monotonic() - start) < seconds:
            due = max(0, int(elapsed * self.rate) - made)
            n = max(0, min(due, max_buffer - len(self.buffer)))
            for _ in range(n):
                o = self.factory.make()
                self.ledger.generated[o.kind] += 1
                self.buffer.append(o)
            self.ledger.skipped_backpressure += due - n  # NATS down for long: do not burst later
            made += due
            await asyncio.sleep(0.05)
        self.generating = False

    async def _connect(self) -> Broker | None:
        try:
            broker = await Broker.connect(self.url, name="soak-publisher")
            await topology.ensure_streams(broker, PACKAGED)
        except Exception as exc:
            self.ledger.errors[f"connect: {type(exc).__name__}"] += 1
            if self.outage_since is None:
                self.outage_since = time.monotonic()
            if self.ledger.errors[f"connect: {type(exc).__name__}"] % 10 == 1:
                log(f"publisher: NATS unreachable ({str(exc)[:120]}); buffering and retrying")
            return None
        return broker

    async def _drop(self) -> None:
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.broker.close(), 5)
            self.broker = None

    async def send(self, give_up_at: float) -> None:
        """Publish until generation stopped and the buffer is empty, or `give_up_at` (monotonic) passed."""
        backoff = 0.1
        while True:
            if not self.buffer:
                if not self.generating:
                    break
                await asyncio.sleep(0.02)
                continue
            if time.monotonic() > give_up_at and not self.generating:
                break
            if self.broker is None or self.broker.nc.is_closed or not self.broker.nc.is_connected:
                await self._drop()
                self.broker = await self._connect()
                if self.broker is None:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
            chunk = [self.buffer.popleft() for _ in range(min(PUBLISH_WINDOW, len(self.buffer)))]
            now = time.monotonic()
            for o in chunk:
                o.attempts += 1
                if o.first_attempt is None:
                    o.first_attempt = now
            js = self.broker.js
            results = await asyncio.gather(
                *(
                    js.publish(o.subject, o.body, timeout=PUBLISH_TIMEOUT_SECONDS, headers={"Nats-Msg-Id": o.msg_id})
                    for o in chunk
                ),
                return_exceptions=True,
            )
            failed = []
            first_error = ""
            for o, r in zip(chunk, results, strict=True):
                if isinstance(r, BaseException):
                    self.ledger.errors[f"publish: {type(r).__name__}"] += 1
                    failed.append(o)
                    first_error = first_error or f"{type(r).__name__}: {str(r)[:100]}"
                else:
                    self.ledger.confirm(o, r)
                    if o.kind in ("valid", "late"):
                        self.factory.recent.append((o.subject, o.body, o.event_id or ""))
            if failed:
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    log(f"publisher: {len(failed)} publish(es) failed ({first_error}); retrying")
                self.buffer.extendleft(reversed(failed))  # retried first, with the same Nats-Msg-Id
                await self._drop()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.1
                if self.outage_since is not None:
                    down = time.monotonic() - self.outage_since
                    self.outages.append({"at": now_iso(), "seconds": round(down, 1)})
                    log(f"publisher: publishing again after {down:.1f} s; {len(self.buffer)} buffered")
                    self.outage_since = None
        await self._drop()
        for o in self.buffer:
            if o.attempts:
                self.ledger.unconfirmed.append(o)
            else:
                self.ledger.never_sent += 1
        self.buffer.clear()


# -- processes -------------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgrp, cmdline) for every process we can read."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if fields and fields[0] == "Z":
            continue
        out[int(entry)] = (int(fields[1]), int(fields[2]), cmd)
    return out


_RUN_ID_IN_PATH = re.compile(r"storage/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/compute_logs")


def find_run_workers(pgid: int, warm: list[int]) -> list[tuple[int, str | None]]:
    """Run workers in the daemon's process group, and the pool processes of the `warm` workers (which run
    one run at a time, run id unknown): (pid, run id when known).

    With the default run launcher the code server (`dagster api grpc`) starts each run as a
    multiprocessing spawn child (`spawn_main ... --multiprocessing-fork`), whose command line does not
    say `execute_run`; the run id is in the compute-log paths its `tail -F` children follow.
    Other launchers run `dagster api execute_run` / `execute_step`: those are matched too.
    """
    procs = _proc_table()
    workers: list[tuple[int, str | None]] = [(pid, None) for pid, (ppid, _, _) in procs.items() if ppid in warm]
    for pid, (ppid, pgrp, cmd) in procs.items():
        if pgrp != pgid:
            continue
        parent = procs.get(ppid, (0, 0, ""))[2]
        if (
            "execute_run" in cmd
            or "execute_step" in cmd
            or ("spawn_main" in cmd and "--multiprocessing-fork" in cmd and "api grpc" in parent)
        ):
            run_id = None
            for cppid, _, ccmd in procs.values():
                if cppid == pid and (m := _RUN_ID_IN_PATH.search(ccmd)):
                    run_id = m.group(1)
                    break
            workers.append((pid, run_id))
    return workers


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# -- faults ------------------------------------------------------------------------------------------


class FaultInjector(threading.Thread):
    KINDS = ("nats", "run-worker", "daemon", "store-outage", "staging-full")

    def __init__(
        self, p: Pipeline, every: float, rng: random.Random, daemon_groups: list[int], kinds: list[str]
    ) -> None:
        super().__init__(name="faults", daemon=True)
        self.kinds = kinds
        self.p = p
        self.every = every
        self.rng = rng
        self.stop = threading.Event()
        self.timeline: list[dict[str, Any]] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()
        self.daemon_groups = daemon_groups
        self.error: str | None = None

    def _record(self, kind: str, **detail: Any) -> None:
        entry = {"at": now_iso(), "elapsed_s": round(time.monotonic() - _T0, 1), "kind": kind, **detail}
        self.timeline.append(entry)
        log("FAULT " + kind + " " + json.dumps(detail, default=str))

    def run(self) -> None:
        try:
            while not self.stop.wait(self.every * self.rng.uniform(0.5, 1.5)):
                kind = self.rng.choice(self.kinds)
                getattr(self, "_" + kind.replace("-", "_"))()
        except Exception:
            self.error = traceback.format_exc()
            log("fault injector crashed:\n" + self.error)

    def _nats(self) -> None:
        down = self.rng.uniform(2, 8)
        pid = self.p.nats.proc.pid if self.p.nats.proc else None
        self.p.nats.kill()
        self.counts["nats-server SIGKILL"] += 1
        self._record("nats-server SIGKILL", pid=pid, down_seconds=round(down, 1))
        time.sleep(down)
        self._start_nats()

    def _start_nats(self) -> None:
        for attempt in range(1, 6):
            try:
                self.p.nats.start()
                log(
                    f"nats-server restarted on the same store (pid {self.p.nats.proc.pid if self.p.nats.proc else '?'})"
                )
                return
            except RuntimeError as exc:
                log(f"nats-server restart attempt {attempt} failed: {exc}")
                time.sleep(1)
        raise RuntimeError("nats-server would not restart")

    def _run_worker(self) -> None:
        """SIGKILL a run worker whose run is still starting or started (not one that is only exiting)."""
        assert self.p.daemon is not None
        deadline = time.monotonic() + WORKER_WAIT_SECONDS
        done_with: set[int] = set()  # workers seen after their run had ended
        while time.monotonic() < deadline and not self.stop.is_set():
            workers = [w for w in find_run_workers(self.p.daemon.pid, self._warm()) if w[0] not in done_with]
            if not workers:
                time.sleep(0.2)
                continue
            target = workers[0][0]
            # Let it get a random distance into its run (start-up, transaction, commit, events); the
            # 20 s are for a worker to appear, so this pause does not count against them.
            pause = self.rng.uniform(0, 10)
            deadline += pause
            time.sleep(pause)
            alive = dict(find_run_workers(self.p.daemon.pid, self._warm()))
            if target not in alive:
                continue
            run_id = alive[target]
            in_progress = self._runs_in_progress()
            if not isinstance(in_progress, list):
                in_progress = []
            mine = [r for r in in_progress if run_id and r.startswith(run_id)]
            if (run_id and not mine) or (not run_id and not in_progress):
                done_with.add(target)  # its run already ended: the process is only shutting down
                continue
            on_warm = _proc_table().get(target, (0, 0, ""))[0] in self._warm()
            pool = "the warm worker's pool process, a run in progress" if on_warm else None
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.counts["run worker SIGKILL"] += 1
            self._record(
                "run worker SIGKILL",
                pid=target,
                run=mine[0] if mine else None,
                phase="run started (compute logs open)" if run_id else pool or "starting (before compute logs)",
                runs_in_progress=in_progress,
            )
            return
        self.skipped["run worker (none in a run within 20 s)"] += 1
        self._record("run worker SIGKILL skipped", reason=f"no run worker in a run within {WORKER_WAIT_SECONDS} s")

    def _warm(self) -> list[int]:
        return [w.pid for w in self.p.workers if w.poll() is None]

    def _runs_in_progress(self) -> list[str] | str:
        """`<run id>:<status>:<batch id>` of every ingest run starting or started, for the timeline."""
        try:
            runs = self.p.runs(DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)
        except Exception as exc:
            return f"? ({type(exc).__name__})"
        return [f"{r.run_id}:{r.status.value}:{r.tags.get('feature_pipeline/batch_id')}" for r in runs]

    def _store_outage(self) -> None:
        """The DuckDB folder replaced by a file for longer than NATS_MAX_DELIVER failed runs take: every run
        fails outside its messages, so nothing may be NAKed or dead-lettered. Started between runs (a rename
        under an open transaction would be a different fault: a disk pulled mid-write)."""
        folder = self.p.db.parent
        deadline = time.monotonic() + WORKER_WAIT_SECONDS
        while self._runs_in_progress() and time.monotonic() < deadline:
            time.sleep(0.2)
        away = folder.with_name(folder.name + ".away")
        folder.rename(away)
        folder.write_text("the store is away (soak fault)")
        self.counts["store outage"] += 1
        self._record("store outage", folder=str(folder), seconds=STORE_OUTAGE_SECONDS)
        time.sleep(STORE_OUTAGE_SECONDS)
        folder.unlink()
        away.rename(folder)
        log("store back")

    def _staging_full(self) -> None:
        """The staging disk left with 4 MiB free: the sensor must stop fetching, not burn deliveries."""
        disk = self.p.staging.parent
        filler = disk / "filler"
        with open(filler, "wb") as fh:
            while (free := shutil.disk_usage(disk).free) > 4 * 1024 * 1024:
                fh.write(b"\0" * min(free - 4 * 1024 * 1024, 1 << 24))
        self.counts["staging disk full"] += 1
        self._record("staging disk full", disk=str(disk), seconds=STAGING_FULL_SECONDS)
        time.sleep(STAGING_FULL_SECONDS)
        filler.unlink()
        log("staging disk has room again")

    def _daemon(self) -> None:
        assert self.p.daemon is not None
        pgid = self.p.daemon.pid
        workers = find_run_workers(pgid, [])
        in_progress = self._runs_in_progress()
        kill_group(pgid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.daemon.wait(10)
        down = self.rng.uniform(2, 5)
        self.counts["daemon group SIGKILL"] += 1
        self._record(
            "daemon group SIGKILL",
            pgid=pgid,
            run_workers_in_group=workers,
            runs_in_progress=in_progress,
            down_seconds=round(down, 1),
        )
        time.sleep(down)
        self.p.start_daemon()
        self.daemon_groups.append(self.p.daemon.pid)
        log(f"dagster-daemon restarted (pgid {self.p.daemon.pid})")


# -- reading the store -----------------------------------------------------------------------------


def ro_connect(db: Path, wait_seconds: float) -> duckdb.DuckDBPyConnection | None:
    deadline = time.monotonic() + wait_seconds
    while True:
        if db.exists():
            try:
                return duckdb.connect(str(db), read_only=True)
            except duckdb.IOException:
                pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def stored_count(db: Path, wait_seconds: float = 5) -> int | None:
    con = ro_connect(db, wait_seconds)
    if con is None:
        return None
    try:
        return con.execute(
            "SELECT (SELECT count(*) FROM signal_events) + (SELECT count(*) FROM feedback_events) "
            "+ (SELECT count(*) FROM dead_letters)"
        ).fetchone()[0]  # type: ignore[index]
    except duckdb.CatalogException:
        return 0
    finally:
        con.close()


async def _consumer_lag(url: str, prefix: str) -> dict[str, int]:
    async with await Broker.connect(url, name="soak-observer") as b:
        out = {}
        for s in with_dead_letters(PACKAGED):
            info = await b.consumer_info(s.name, consumer_name(prefix, s))
            out[s.name] = info.num_pending + info.num_ack_pending
        return out


def lag_now(p: Pipeline) -> dict[str, int] | None:
    try:
        return asyncio.run(asyncio.wait_for(_consumer_lag(p.nats.url, p.prefix), 15))
    except Exception:
        return None


def runs_by_status(p: Pipeline) -> dict[str, int]:
    try:
        return dict(collections.Counter(r.status.value for r in p.runs()))
    except Exception as exc:
        return {"?": 0, "error": str(exc)[:200]}  # type: ignore[dict-item]


async def _stream_check(url: str, items: list[tuple[str, int]], prefix: str) -> dict[str, Any]:
    """For lost messages: is each still in its stream, and is it below its consumer's ack floor?"""
    out: dict[str, Any] = {"messages": {}, "ack_floor": {}}
    async with await Broker.connect(url, name="soak-investigate") as b:
        for s in with_dead_letters(PACKAGED):
            with contextlib.suppress(Exception):
                info = await b.consumer_info(s.name, consumer_name(prefix, s))
                out["ack_floor"][s.name] = info.ack_floor.stream_seq
        for stream, seq in items:
            try:
                msg = await b.js.get_msg(stream, seq)
                out["messages"][f"{stream}#{seq}"] = "in stream" if msg else "missing"
            except Exception as exc:
                out["messages"][f"{stream}#{seq}"] = f"not in stream ({type(exc).__name__})"
    return out


# -- reconciliation --------------------------------------------------------------------------------


def reconcile(
    p: Pipeline, ledger: Ledger, faults: FaultInjector, lag: dict[str, int] | None, staged: list[str]
) -> dict[str, Any]:
    con = ro_connect(p.db, 120)
    if con is None:
        raise RuntimeError(f"could not open {p.db} read-only within 120 s")
    try:
        raw = con.execute(
            "SELECT event_id, count(*) FROM (SELECT event_id FROM signal_events UNION ALL "
            "SELECT event_id FROM feedback_events) GROUP BY event_id"
        ).fetchall()
        dl_rows = con.execute(
            "SELECT original_stream, original_seq, body, reason, delivery_count FROM dead_letters"
        ).fetchall()
        per_user = con.execute(
            "SELECT uf.user_id, uf.signal_count_total, "
            "(SELECT count(*) FROM signal_events e WHERE e.user_id = uf.user_id AND e.occurred_at <= uf.updated_at) "
            "FROM user_features uf ORDER BY uf.user_id"
        ).fetchall()
        missing_rows = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT user_id FROM (SELECT user_id FROM signal_events UNION SELECT user_id FROM "
                "feedback_events) WHERE user_id NOT IN (SELECT user_id FROM user_features) ORDER BY 1"
            ).fetchall()
        ]
        feature_rows = con.execute("SELECT count(*) FROM user_features").fetchone()[0]  # type: ignore[index]
        # Every row. Not sample=10**9: DuckDB's `USING SAMPLE reservoir(N ROWS)` sizes its buffers by N, and
        # with the TIMESTAMPTZ column N=10**9 asks for 7.4 GiB and fails (store/features.py, inconsistent_users).
        checked, bad_users = inconsistent_users(con, max(1, feature_rows), load_registry())
    finally:
        con.close()

    stored = {eid: n for eid, n in raw}
    stored_twice = sorted(eid for eid, n in stored.items() if n > 1)
    dl_keys = set()
    dl_ids: collections.Counter[str] = collections.Counter()
    for stream, seq, body, _reason, _dc in dl_rows:
        dl_keys.add((stream, int(seq)))
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            doc = json.loads(bytes(body)) if body is not None else None
            if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                dl_ids[doc["id"]] += 1

    lost = sorted(
        eid
        for eid, c in ledger.valid.items()
        if eid not in stored and eid not in dl_ids and (c.stream, c.seq) not in dl_keys
    )
    valid_stored = sum(1 for eid in ledger.valid if eid in stored)
    valid_dead = sum(
        1 for eid, c in ledger.valid.items() if eid not in stored and (eid in dl_ids or (c.stream, c.seq) in dl_keys)
    )
    poison_keys = {(c.stream, c.seq) for c in ledger.poison}
    poison_dead = sum(1 for c in ledger.poison if (c.stream, c.seq) in dl_keys)
    poison_missing = [c for c in ledger.poison if (c.stream, c.seq) not in dl_keys]
    dup_absorbed = sum(1 for c in ledger.dups if stored.get(c.event_id or "") == 1)
    dup_dead = sum(1 for c in ledger.dups if (c.stream, c.seq) in dl_keys)
    valid_keys = {(c.stream, c.seq) for c in ledger.valid.values()}
    dup_keys = {(c.stream, c.seq) for c in ledger.dups}
    dl_other = len(dl_keys - poison_keys - valid_keys - dup_keys)
    known_ids = set(ledger.valid) | {o.event_id for o in ledger.unconfirmed if o.event_id}
    unexpected_stored = sorted(eid for eid in stored if eid not in known_ids)
    over = [(u, total, recount) for u, total, recount in per_user if total > recount]
    under = [(u, total, recount) for u, total, recount in per_user if total < recount]
    overcount = sum(t - r for _, t, r in over)
    double_counted = len(stored_twice) + overcount

    late = sum(1 for c in ledger.valid.values() if c.kind == "late")
    result: dict[str, Any] = {
        "events published (valid unique ids)": len(ledger.valid),
        "  of which late (hours/days old)": late,
        "stored (valid ids in signal_events/feedback_events)": valid_stored,
        "  raw rows total": sum(stored.values()),
        "dead-lettered (dead_letters rows)": len(dl_rows),
        "  poison / valid events / duplicate copies / other": f"{poison_dead} / {valid_dead} / {dup_dead} / {dl_other}",
        "duplicates published / absorbed": f"{len(ledger.dups)} / {dup_absorbed}",
        "poison published / dead-lettered": f"{len(ledger.poison)} / {poison_dead}",
        "faults injected": dict(faults.counts),
        "faults skipped": dict(faults.skipped),
        "lost": len(lost),
        "double counted": double_counted,
        "  ids stored twice / signal_count_total over recount": f"{len(stored_twice)} / {overcount}",
        "inconsistent user_features rows": len(bad_users),
        "  rows checked / users without a row / undercounted users": f"{checked} / {len(missing_rows)} / {len(under)}",
        "consumer lag at end": lag if lag is not None else "unknown (NATS unreachable)",
        "staged batches left": len(staged),
        "ingest runs by status": runs_by_status(p),
        "publish: retried / dedup hits / unconfirmed / never sent": (
            f"{ledger.retried} / {ledger.dedup_hits} / {len(ledger.unconfirmed)} / {ledger.never_sent}"
        ),
        "stored ids not in the ledger": len(unexpected_stored),
        "user_features rows": feature_rows,
    }
    lag_total = sum(lag.values()) if lag is not None else 1
    failures = []
    if lost:
        failures.append(f"{len(lost)} valid event(s) lost")
    if valid_dead:
        failures.append(f"{valid_dead} valid event(s) dead-lettered")
    if double_counted:
        failures.append(f"{double_counted} double counted")
    if bad_users or missing_rows:
        failures.append(f"{len(bad_users)} inconsistent user_features row(s), {len(missing_rows)} missing")
    if lag_total:
        failures.append(f"consumer lag at end: {lag}")
    if staged:
        failures.append(f"{len(staged)} staged batch(es) left")
    if poison_missing:
        failures.append(f"{len(poison_missing)} poison message(s) neither stored nor dead-lettered")
    if ledger.seq_collisions:
        failures.append(f"{len(ledger.seq_collisions)} PubAck sequence collision(s)")
    details: dict[str, Any] = {
        "lost": [
            {
                "id": eid,
                **{k: getattr(ledger.valid[eid], k) for k in ("subject", "stream", "seq", "kind", "confirmed_at")},
            }
            for eid in lost[:200]
        ],
        "stored_twice": stored_twice[:200],
        "overcounted_users": over[:50],
        "undercounted_users": under[:50],
        "inconsistent_users": bad_users[:200],
        "users_without_row": missing_rows[:200],
        "poison_missing": [{"msg_id": c.msg_id, "stream": c.stream, "seq": c.seq} for c in poison_missing[:200]],
        "unexpected_stored": unexpected_stored[:200],
        "seq_collisions": ledger.seq_collisions[:50],
        "slow_confirms": ledger.slow_confirms[:50],
        "unconfirmed": [{"msg_id": o.msg_id, "kind": o.kind, "attempts": o.attempts} for o in ledger.unconfirmed[:50]],
        "publish_errors": dict(ledger.errors),
        "generated": dict(ledger.generated),
        "skipped_backpressure": ledger.skipped_backpressure,
    }
    if lost or poison_missing:
        items = [(ledger.valid[e].stream, ledger.valid[e].seq) for e in lost[:50]]
        items += [(c.stream, c.seq) for c in poison_missing[:20]]
        try:
            details["lost_in_nats"] = asyncio.run(asyncio.wait_for(_stream_check(p.nats.url, items, p.prefix), 60))
        except Exception as exc:
            details["lost_in_nats"] = f"could not check: {exc!r}"
    return {"table": result, "failures": failures, "details": details}


def print_table(table: dict[str, Any]) -> None:
    width = max(len(k) for k in table) + 2
    print("\n" + "=" * (width + 50))
    print("SOAK RESULT")
    print("-" * (width + 50))
    for k, v in table.items():
        shown = ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else str(v)
        print(f"{k:<{width}}{shown or '-'}")
    print("=" * (width + 50), flush=True)


# -- the run ---------------------------------------------------------------------------------------


def wait_settled(p: Pipeline, timeout: float) -> tuple[bool, dict[str, int] | None, list[str]]:
    """Until nothing is staged, every consumer lag is 0 and the stored count is stable for STABLE_SECONDS."""
    deadline = time.monotonic() + timeout
    stable_since: float | None = None
    last_count: int | None = None
    last_log = 0.0
    lag: dict[str, int] | None = None
    staged: list[str] = []
    while time.monotonic() < deadline:
        staged = p.staged()
        lag = lag_now(p)
        count = stored_count(p.db, 5)
        settled = not staged and lag is not None and not any(lag.values())
        if settled and count is not None and count == last_count:
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= STABLE_SECONDS:
                return True, lag, staged
        else:
            stable_since = time.monotonic() if settled and count is not None else None
        last_count = count
        if time.monotonic() - last_log > 15:
            log(f"draining: staged={len(staged)} lag={lag} stored+dead={count} runs={runs_by_status(p)}")
            last_log = time.monotonic()
        time.sleep(2)
    return False, lag, staged


async def publish_phase(p: Pipeline, args: argparse.Namespace, publisher: Publisher, seconds: float) -> None:
    async def progress() -> None:
        while publisher.generating:
            await asyncio.sleep(30)
            led = publisher.ledger
            count = await asyncio.to_thread(stored_count, p.db, 1)
            runs = await asyncio.to_thread(runs_by_status, p)
            log(
                f"progress: confirmed valid={len(led.valid)} dup={len(led.dups)} poison={len(led.poison)} "
                f"buffered={len(publisher.buffer)} staged={len(p.staged())} stored+dead={count} runs={runs}"
            )

    gen = asyncio.create_task(publisher.generate(seconds))
    prog = asyncio.create_task(progress())
    give_up_at = time.monotonic() + seconds + FINAL_PUBLISH_SECONDS
    try:
        await publisher.send(give_up_at)
    finally:
        gen.cancel()
        prog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gen
        with contextlib.suppress(asyncio.CancelledError):
            await prog


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _mount_staging_disk(where: Path) -> Path | None:
    """A small real filesystem for the staging folder (tmpfs; needs root), so the disk can be filled."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={STAGING_DISK_MIB}m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        log(f"no staging-full faults: cannot mount a tmpfs here ({done.stderr.strip()}); run as root for them")
        return None
    return where


def main(argv: list[str] | None = None) -> int:
    global _LOG_FILE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, required=True, help="how long to publish and inject faults")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("--rate", type=float, default=200.0, help="events per second (default 200)")
    ap.add_argument("--fault-every", type=float, default=45.0, help="mean seconds between faults (default 45)")
    ap.add_argument("--users", type=int, default=200, help="distinct users (default 200)")
    ap.add_argument("--drain-timeout", type=float, default=300.0, help="max seconds to catch up (default 300)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder even when the run passes")
    ap.add_argument(
        "--faults",
        default=",".join(FaultInjector.KINDS),
        help="fault kinds to pick from, comma separated (default: all of " + ",".join(FaultInjector.KINDS) + ")",
    )
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.fault_every <= 0:
        ap.error("--minutes, --rate and --fault-every must be positive")
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    if not kinds or set(kinds) - set(FaultInjector.KINDS):
        ap.error(f"--faults takes a comma separated subset of {','.join(FaultInjector.KINDS)}")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    seconds = args.minutes * 60

    root = Path(tempfile.mkdtemp(prefix="fp-soak-"))
    _LOG_FILE = root / "soak.log"
    env = dict(EXTRA_ENV)
    env["FEATURE_STORE_PATH"] = str(root / "store" / "store.duckdb")  # a folder of its own, for store-outage
    if "staging-full" in kinds:
        disk = _mount_staging_disk(root / "staging-disk")
        if disk is None:
            kinds.remove("staging-full")
        else:
            env["FEATURE_PIPELINE_STAGING_DIR"] = str(disk / "staging")
    p = Pipeline(root, env)
    p.db, p.staging = Path(env["FEATURE_STORE_PATH"]), Path(env.get("FEATURE_PIPELINE_STAGING_DIR", p.staging))
    daemon_groups: list[int] = []
    ledger = Ledger()
    faults = FaultInjector(p, args.fault_every, random.Random(rng.randrange(2**31)), daemon_groups, kinds)
    factory = EventFactory(random.Random(rng.randrange(2**31)), args.users, uuid.uuid4().hex[:6])
    started = now_iso()
    code = 2
    cleaned = threading.Event()

    def cleanup() -> None:
        if cleaned.is_set():
            return
        cleaned.set()
        faults.stop.set()
        if faults.is_alive():
            faults.join(30)
        with contextlib.suppress(Exception):
            p.close()
        for pgid in daemon_groups:  # orphans of a daemon that died (a code server, run workers)
            kill_group(pgid)
        with contextlib.suppress(Exception):
            p.nats.kill()
        subprocess.run(["umount", "-l", str(root / "staging-disk")], capture_output=True, check=False)

    budget = seconds + FINAL_PUBLISH_SECONDS + args.drain_timeout + 600

    def watchdog_fire() -> None:
        log(f"WATCHDOG: the soak exceeded {budget:.0f} s; killing its processes (root kept at {root})")
        cleanup()
        os._exit(3)

    watchdog = threading.Timer(budget, watchdog_fire)
    watchdog.daemon = True
    signal.signal(signal.SIGTERM, _interrupt)
    log(
        f"soak: {args.minutes} min at {args.rate}/s, a fault every ~{args.fault_every} s, seed {seed}, "
        f"root {root}, env {EXTRA_ENV}"
    )
    try:
        watchdog.start()
        try:
            p.start()
        except Exception as exc:
            log(f"could not start the pipeline: {exc!r}")
            return 2
        assert p.daemon is not None
        daemon_groups.append(p.daemon.pid)
        log(f"nats-server {p.nats.url} (pid {p.nats.proc.pid if p.nats.proc else '?'}), daemon pgid {p.daemon.pid}")
        publisher = Publisher(p.nats.url, args.rate, factory, ledger)
        faults.start()
        asyncio.run(publish_phase(p, args, publisher, seconds))
        log("publishing stopped; stopping the fault injector")
        faults.stop.set()
        faults.join(60)
        if faults.is_alive():
            log("fault injector still busy after 60 s")
        # Whatever the last fault did, both must be up for the drain.
        if p.nats.proc is None or p.nats.proc.poll() is not None:
            log("nats-server is down after the fault phase: starting it")
            p.nats.start()
        if p.daemon is None or p.daemon.poll() is not None:
            log(f"dagster-daemon is not running (exit {p.daemon.returncode if p.daemon else None}): starting it")
            kill_group(daemon_groups[-1])
            p.start_daemon()
            daemon_groups.append(p.daemon.pid)  # type: ignore[union-attr]
        log(
            f"confirmed: valid={len(ledger.valid)} dup={len(ledger.dups)} poison={len(ledger.poison)} "
            f"unconfirmed={len(ledger.unconfirmed)} never sent={ledger.never_sent}; waiting up to "
            f"{args.drain_timeout:.0f} s for the pipeline to catch up"
        )
        caught_up, lag, staged = wait_settled(p, args.drain_timeout)
        log("caught up" if caught_up else f"did NOT catch up within {args.drain_timeout:.0f} s")
        try:
            out = reconcile(p, ledger, faults, lag, staged)
        except Exception:
            log("reconciliation crashed:\n" + traceback.format_exc())
            print("\n" + p.diagnostics(), flush=True)
            code = 1
            return code
        out["table"]["caught up within drain timeout"] = caught_up
        print_table(out["table"])
        ok = not out["failures"] and faults.error is None
        if faults.error:
            out["failures"].append("the fault injector crashed")
        record = {
            "started": started,
            "finished": now_iso(),
            "args": {k: v for k, v in vars(args).items()},
            "seed": seed,
            "env": EXTRA_ENV,
            "root": str(root),
            "result": "PASS" if ok else "FAIL",
            "failures": out["failures"],
            "table": out["table"],
            "fault_timeline": faults.timeline,
            "publisher_outages": publisher.outages,
            "details": out["details"],
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(record, indent=1, default=str))
        log(f"results written to {path}")
        if ok:
            log("PASS")
            code = 0
        else:
            log("FAIL: " + "; ".join(out["failures"]))
            print("\n--- fault timeline ---")
            for f in faults.timeline:
                print(json.dumps(f, default=str))
            print("\n--- details ---")
            print(json.dumps({k: v for k, v in out["details"].items() if v}, indent=1, default=str)[:20000])
            print("\n" + p.diagnostics(), flush=True)
            code = 1
        return code
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
        return code
    finally:
        cleanup()
        watchdog.cancel()
        if code == 0 and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root} (daemon log: {p.daemon_log}, soak log: {_LOG_FILE})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
