"""Shared helpers for the benchmark scripts: publishing, lag, /proc sampling, DuckDB reads, cleanup.

Everything talks to 127.0.0.1 only. Nothing here changes the pipeline; it drives it from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from feature_pipeline.envelopes import make_envelope
from feature_pipeline.samples import sample_data
from feature_pipeline.testing import query  # noqa: F401 - re-exported for the phases

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
SIGNAL_SUBJECTS = ["signals.task.synced", "signals.task.completed", "signals.session.started"]
FEEDBACK_SUBJECTS = [
    "feedback.recommendation.shown",
    "feedback.recommendation.accepted",
    "feedback.recommendation.dismissed",
]
SUBJECTS = SIGNAL_SUBJECTS + FEEDBACK_SUBJECTS
DATA_STREAMS = ("SIGNALS", "FEEDBACK")


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# -- cleanup ------------------------------------------------------------------------------------

_CLEANUPS: list[Callable[[], None]] = []
_CLEANUP_LOCK = threading.Lock()


def on_cleanup(fn: Callable[[], None]) -> Callable[[], None]:
    with _CLEANUP_LOCK:
        _CLEANUPS.append(fn)
    return fn


def forget_cleanup(fn: Callable[[], None]) -> None:
    with _CLEANUP_LOCK, contextlib.suppress(ValueError):
        _CLEANUPS.remove(fn)


def run_cleanups() -> None:
    with _CLEANUP_LOCK:
        fns = list(reversed(_CLEANUPS))
        _CLEANUPS.clear()
    for fn in fns:
        with contextlib.suppress(Exception):
            fn()


def start_watchdog(seconds: float) -> threading.Timer:
    """Hard cap on the whole run: kill what we started and exit, whatever is hanging."""

    def fire() -> None:
        print(f"\n!!! bench watchdog: the run exceeded {seconds:.0f} s; killing its processes", flush=True)
        run_cleanups()
        os._exit(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


# -- machine ------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    server = subprocess.run([str(VENV_BIN / "nats-server"), "--version"], capture_output=True, text=True).stdout
    from importlib.metadata import version

    return {
        "nproc": int(nproc) if nproc.isdigit() else os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(mem_kb / 1024 / 1024, 1),
        "loadavg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dagster": version("dagster"),
        "duckdb": version("duckdb"),
        "pyarrow": version("pyarrow"),
        "nats_py": version("nats-py"),
        "nats_server": server.strip(),
    }


# -- publishing ---------------------------------------------------------------------------------


class EventMaker:
    """Contract-conforming envelopes, the same shapes `feature-pipeline publish` sends."""

    def __init__(self, users: int, seed: int = 7) -> None:
        self.users = users
        self.rng = random.Random(seed)

    def make(self, event_id: str, now: datetime) -> tuple[str, bytes]:
        subject = SUBJECTS[self.rng.randrange(len(SUBJECTS))]
        user = f"u-{self.rng.randrange(self.users)}"
        return subject, make_envelope(event_id, subject.split(".", 1)[1], user, now, sample_data(subject, self.rng))


async def connect(url: str, name: str) -> nats.aio.client.Client:
    return await nats.connect(url, name=name, connect_timeout=2, allow_reconnect=False, pending_size=256 * 1024 * 1024)


async def ensure_streams(url: str) -> None:
    from feature_pipeline.broker import topology
    from feature_pipeline.broker.client import Broker
    from feature_pipeline.streams import PACKAGED

    async with await Broker.connect(url, name="bench-setup") as b:
        await topology.ensure_streams(b, PACKAGED)


class Publisher:
    """JetStream publishes as core publishes with a reply inbox, PubAcks counted on one wildcard subscription.

    About twice the rate of `js.publish_async` + gather here (no Future per message); every message
    still gets its PubAck (counted, errors kept) and carries a `Nats-Msg-Id` like a real producer's.
    """

    def __init__(self, nc: Any, window: int = 5000) -> None:
        self.nc = nc
        self.window = window
        self.sent = self.acked = self.errors = 0
        self.last_error = b""
        self.prefix = ""

    async def start(self) -> Publisher:
        self.prefix = self.nc.new_inbox()
        await self.nc.subscribe(self.prefix + ".*", cb=self._on_ack, pending_msgs_limit=1_000_000)
        return self

    async def _on_ack(self, msg: Any) -> None:
        self.acked += 1
        if b'"error"' in msg.data:
            self.errors += 1
            self.last_error = msg.data

    async def publish(self, subject: str, body: bytes, event_id: str) -> None:
        await self.nc.publish(subject, body, reply=f"{self.prefix}.{self.sent}", headers={"Nats-Msg-Id": event_id})
        self.sent += 1
        if self.sent - self.acked > self.window:
            await self.wait(self.window // 2)

    async def wait(self, outstanding: int = 0, timeout: float = 30.0) -> None:
        await self.nc.flush(timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.sent - self.acked > outstanding:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.sent - self.acked} publishes unconfirmed after {timeout:.0f} s")
            await asyncio.sleep(0.002)
        if self.errors:
            raise RuntimeError(f"{self.errors} publishes rejected by JetStream, last: {self.last_error!r}")


async def publish_backlog(url: str, count: int, users: int, prefix: str, deadline: float) -> float:
    """Publish `count` events as fast as the broker confirms them; returns events/s."""
    maker = EventMaker(users)
    nc = await connect(url, "bench-publisher")
    t0 = time.perf_counter()
    try:
        pub = await Publisher(nc).start()
        now = datetime.now(UTC)
        for i in range(count):
            if i % 2000 == 0:
                now = datetime.now(UTC)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"publishing the backlog took too long ({i}/{count} published)")
            eid = f"{prefix}-{i}"
            subject, body = maker.make(eid, now)
            await pub.publish(subject, body, eid)
        await pub.wait()
    finally:
        await nc.close()
    return count / (time.perf_counter() - t0)


# -- consumers and lag --------------------------------------------------------------------------


async def add_pull_consumer(js: Any, stream: str, durable: str, max_ack_pending: int) -> None:
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=300.0, max_ack_pending=max_ack_pending
        ),
    )


async def stream_counts(js: Any) -> dict[str, int]:
    return {s: (await js.stream_info(s)).state.messages for s in DATA_STREAMS}


async def lag(js: Any, prefix: str) -> dict[str, int | None]:
    """num_pending + num_ack_pending per stream of the pipeline's durables (None: not created yet)."""
    out: dict[str, int | None] = {}
    for stream, key in (("SIGNALS", "signals"), ("FEEDBACK", "feedback"), ("DEADLETTER", "deadletter")):
        try:
            info = await asyncio.wait_for(js.consumer_info(stream, f"{prefix}-{key}"), 5)
            out[stream] = (info.num_pending or 0) + (info.num_ack_pending or 0)
        except Exception:
            out[stream] = None
    return out


def total_lag(lags: dict[str, int | None]) -> int | None:
    vals = [lags.get(s) for s in DATA_STREAMS]
    return None if any(v is None for v in vals) else sum(v for v in vals if v is not None)


# -- DuckDB -------------------------------------------------------------------------------------


# -- /proc sampling -----------------------------------------------------------------------------


def _ppid_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        kids.setdefault(int(rest[1]), []).append(int(entry))
    return kids


def descendants(root: int) -> list[int]:
    kids = _ppid_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def mem_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        return None
    return rss, hwm


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (its own, not its waited-for children's)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLOCK_TICKS


def classify(cmd: str) -> str:
    if "dagster-daemon" in cmd:
        return "daemon"
    if "api grpc" in cmd or "code-server" in cmd:
        return "code server"
    # DefaultRunLauncher: the code server starts each run in a multiprocessing-spawned child.
    if "multiprocessing.spawn" in cmd or "api execute_run" in cmd or "dagster_celery.app worker" in cmd:
        return "run worker"  # a spawned run, or the warm worker and its pool process
    if "resource_tracker" in cmd:
        return "mp resource tracker"
    if "watch_orphans" in cmd or cmd.startswith("tail -F"):
        return "compute-log tail"
    if "nats-server" in cmd:
        return "nats-server"
    if "py-spy" in cmd:
        return "profiler"
    return "other"


class RssSampler(threading.Thread):
    """Every `interval` s: VmRSS (and the kernel's high-water mark VmHWM) of every process in the trees."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self.roots: dict[str, int] = {}
        self.procs: dict[int, dict[str, Any]] = {}
        self.total_peak_kb = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def watch(self, label: str, pid: int) -> None:
        with self._lock:
            self.roots[label] = pid

    def unwatch(self, label: str) -> None:
        with self._lock:
            self.roots.pop(label, None)

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> None:
        with self._lock:
            roots = list(self.roots.values())
        total = 0
        for root in roots:
            for pid in descendants(root):
                m = mem_kb(pid)
                if m is None:
                    continue
                rec = self.procs.get(pid)
                if rec is None:
                    cmd = cmdline(pid)
                    rec = self.procs[pid] = {
                        "pid": pid,
                        "kind": classify(cmd),
                        "cmd": cmd[:160],
                        "peak_rss_kb": 0,
                        "hwm_kb": 0,
                        "first_seen": time.time(),
                    }
                rec["cpu_seconds"] = max(rec.get("cpu_seconds", 0.0), cpu_seconds(pid) or 0.0)
                rec["peak_rss_kb"] = max(rec["peak_rss_kb"], m[0])
                rec["hwm_kb"] = max(rec["hwm_kb"], m[1])
                rec["last_seen"] = time.time()
                if rec["kind"] != "profiler":
                    total += m[0]
        self.total_peak_kb = max(self.total_peak_kb, total)

    def run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.sample()
            self._stop.wait(self.interval)

    def alive_pids(self) -> list[int]:
        return [pid for pid, rec in self.procs.items() if rec["kind"] != "profiler" and mem_kb(pid) is not None]

    def by_kind(self, since: float = 0.0) -> dict[str, dict[str, Any]]:
        """Peak per process kind (max over its processes of sampled VmRSS and VmHWM), in MiB."""
        out: dict[str, dict[str, Any]] = {}
        for rec in self.procs.values():
            if rec.get("last_seen", 0) < since:
                continue
            kind = rec["kind"]
            agg = out.setdefault(kind, {"processes": 0, "peak_rss_mib": 0.0, "peak_hwm_mib": 0.0})
            agg["processes"] += 1
            agg["peak_rss_mib"] = max(agg["peak_rss_mib"], round(rec["peak_rss_kb"] / 1024, 1))
            agg["peak_hwm_mib"] = max(agg["peak_hwm_mib"], round(rec["hwm_kb"] / 1024, 1))
        return out

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds per process kind, summed over its processes (as last sampled: a process that ended
        between two samples misses at most one interval's worth)."""
        out: dict[str, float] = {}
        for rec in self.procs.values():
            if rec["kind"] != "profiler":
                out[rec["kind"]] = round(out.get(rec["kind"], 0.0) + rec.get("cpu_seconds", 0.0), 2)
        return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points)
    if den == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in points) / den
