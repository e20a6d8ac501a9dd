"""`feature-pipeline up`: a local NATS when none answers, the warm run worker (unless `--spawn`), then the
Dagster UI and daemon."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from feature_pipeline import local_worker, shards
from feature_pipeline.broker.auth import redact
from feature_pipeline.broker.local import LocalNats, port_open
from feature_pipeline.cli.common import dagster_home, fail, instance_lock, load_settings, prepare_dagster_home
from feature_pipeline.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="start NATS (if none answers), the Dagster UI and daemon with the sensor on")
    up.add_argument("--host", default="127.0.0.1", help="webserver bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=3000)
    how = up.add_mutually_exclusive_group()
    how.add_argument(
        "--warm",
        action="store_true",
        help="run batches on the warm local worker (Celery on folders, no service): the default; with it, a "
        "dagster.yaml of your own in DAGSTER_HOME is an error instead of a reason to spawn",
    )
    how.add_argument(
        "--spawn",
        action="store_true",
        help="start a new process per run, as the project's dagster.yaml says, instead of the warm worker",
    )
    up.set_defaults(func=cmd_up)


def cmd_up(args: argparse.Namespace) -> int:
    """`up`, and when it cannot start, why in one line (never a traceback)."""
    try:
        return _up(args)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return fail(f"up: cannot start: {type(exc).__name__}: {exc}")


def _up(args: argparse.Namespace) -> int:
    project = Path.cwd()
    if not (project / "workspace.yaml").is_file() or not (project / "dagster.yaml").is_file():
        return fail("run `feature-pipeline up` from the project folder (the one with workspace.yaml and dagster.yaml)")
    cfg = load_settings()
    refused = shards.local_layout_problem(cfg)
    if refused:
        return fail(f"up: {refused}")
    home = dagster_home()
    prepare_dagster_home(home, project)
    warm = not args.spawn
    problem = _instance_config(home, project, warm)
    if problem and args.warm:
        return fail(problem)
    if problem:  # the default meets a dagster.yaml of the user's own: it decides how runs start
        print(f"not starting the warm run worker: {problem.split(';')[0]}; runs start as it says")
        warm = False
    problem = create_storage(home)
    if problem:
        return fail(problem)
    env = dict(os.environ)
    try:
        local = _nats(cfg, project, env)
    except RuntimeError as exc:
        return fail(str(exc))
    refused = _recorded_layout(cfg, env.get("NATS_URL", cfg.nats_url))
    if refused:
        if local:
            local.stop()
        return fail(f"up: {refused}")
    env["DAGSTER_HOME"] = str(home)
    # Absolute paths, so the code server and run workers agree whatever their working directory.
    env["FEATURE_STORE_PATH"] = cfg.feature_store_path
    env["FEATURE_PIPELINE_STAGING_DIR"] = cfg.staging_dir
    env["FEATURE_PIPELINE_SERVING_PATH"] = cfg.serving_path
    if cfg.features_file:
        env["FEATURE_PIPELINE_FEATURES_FILE"] = cfg.features_file
    workers = _start_workers(home, env, cfg.shards) if warm else []
    print(f"Dagster UI: http://{args.host}:{args.port}  (DAGSTER_HOME={home}); Ctrl-C stops everything")
    print("then, in another shell: feature-pipeline publish --user u-42 && feature-pipeline features u-42")
    try:
        return _run_dagster(project, home, env, args.host, args.port)
    finally:
        _stop_workers(workers)  # Celery's warm shutdown: a running run finishes
        if local:
            local.stop()


def _instance_config(home: Path, project: Path, warm: bool) -> str | None:
    """Warm (the default), DAGSTER_HOME's dagster.yaml sends runs to the local worker; `up --spawn` puts the
    project's back. A dagster.yaml of the user's own is never replaced: the returned problem says so."""
    target, original = home / "dagster.yaml", project / "dagster.yaml"
    written_by_warm = target.read_text().startswith(local_worker.MARKER)
    if not warm:
        if written_by_warm:
            shutil.copyfile(original, target)
        return None
    if not written_by_warm and target.read_text() != original.read_text():
        return (
            f"{target} is not a copy of {original}; the warm worker would replace it: move it away, or run `up --spawn`"
        )
    target.write_text(local_worker.instance_config(original, home))
    return None


CREATE_ATTEMPTS = 3


def create_storage(home: Path) -> str | None:
    """Create (or migrate) the instance's storage before the webserver and daemon start, or say in one line
    why it cannot be. Both would do it at once, and two SQLite schema creations racing fail on
    `alembic_version`; so creation takes a lock against this tool's other processes and, against anything
    else that creates it at the same moment (a `dagster` command), is retried: once the other has finished,
    opening the storage finds it made."""
    import dagster as dg  # slow import: only here

    problem = ""
    for _ in range(CREATE_ATTEMPTS):
        try:
            with instance_lock(home), dg.DagsterInstance.from_config(str(home)):
                return None
        except Exception as exc:  # a concurrent creation, or a storage that cannot be made: retried, then named
            problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return f"cannot create the Dagster instance's storage at {home}: {problem}"


def _start_workers(home: Path, env: dict[str, str], n: int) -> list[subprocess.Popen[bytes]]:
    """One warm worker per shard, each serving its shard's queue: a shard's runs go one at a time, different
    shards' side by side."""
    env.update(local_worker.celery_env(home))
    local_worker.prepare(home)
    cmd = [str(Path(sys.executable).parent / "feature-pipeline"), "worker"]
    workers = []
    for shard in range(n):
        worker = subprocess.Popen([*cmd, *(["--shard", str(shard)] if n > 1 else [])], env=env, start_new_session=True)
        of = f" (shard {shard} of {n})" if n > 1 else ""
        print(f"warm run worker{of}: pid {worker.pid}, queue folder {home / 'celery'}")
        workers.append(worker)
    return workers


def _stop_workers(workers: list[subprocess.Popen[bytes]], grace: float = 60.0) -> None:
    """SIGTERM every worker at once (each lets its running run finish), then wait for them together."""
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for worker in workers:
        _stop_group(worker, signal.SIGTERM, grace=max(0.1, deadline - time.monotonic()))


def _recorded_layout(cfg: Settings, url: str) -> str | None:
    """Why the number of shards recorded beside the online store refuses this start, or None (also when NATS
    cannot say: the sensor checks on every tick, and holds ingestion in words)."""
    import asyncio
    import dataclasses

    from feature_pipeline.broker.client import Broker
    from feature_pipeline.ingest import layout

    async def read() -> dict[str, Any] | None:
        async with await Broker.connect(url, "feature-pipeline-up", cfg.nats_auth) as broker:
            return await asyncio.wait_for(layout.recorded(broker, cfg), 10)

    try:
        found = asyncio.run(read())
    except Exception:
        return None
    return None if found is None else layout.refused(found, dataclasses.replace(cfg, nats_url=url))


def _nats(cfg: Settings, project: Path, env: dict[str, str]) -> LocalNats | None:
    """The NATS at NATS_URL if it answers; else a local one when the URL points here; else an error."""
    first = urlparse(cfg.nats_url.split(",")[0])
    host, port = first.hostname or "127.0.0.1", first.port or 4222
    if port_open(host, port):
        print(f"using NATS at {redact(cfg.nats_url)}")
        return None
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise RuntimeError(
            f"NATS_URL={redact(cfg.nats_url)} does not answer; start it or unset NATS_URL for a local one"
        )
    local = LocalNats(project / "data" / "nats", port=port, log_file=str(project / "data" / "nats.log")).start()
    env["NATS_URL"] = local.url
    print(f"started a local nats-server with JetStream at {local.url} (store ./data/nats, log ./data/nats.log)")
    return local


def _run_dagster(project: Path, home: Path, env: dict[str, str], host: str, port: int) -> int:
    # `dg dev` (what `dagster dev` now defers to) on this workspace file, whatever folder the checkout is in.
    cmd = [str(Path(sys.executable).parent / "dg"), "dev", "-w", str(project / "workspace.yaml")]
    cmd += ["-h", host, "-p", str(port)]
    # Run from DAGSTER_HOME so dagster does not warn about the project's own dagster.yaml; in its own
    # process group so that Ctrl-C or a SIGTERM to this command stops the whole tree, NATS last.
    proc = subprocess.Popen(cmd, env=env, cwd=home, start_new_session=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return _stop_group(proc)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, grace: float = 20.0) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()
