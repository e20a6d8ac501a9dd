"""`feature-pipeline worker`: a warm Celery run worker for the runs of deploy/dagster.yaml's launcher.

The worker keeps the code location imported between runs, so a batch's run starts in a fraction of
a second instead of spawning a Python process. It must see the same Dagster instance (DAGSTER_HOME
with the same dagster.yaml), the same result backend as the launcher and the same variables as the
code location; it stores batches in FEATURE_STORE_PATH, so it runs on the host that owns the file.
After a deploy, restart it: a warm worker keeps the code it imported when it started.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from feature_pipeline import local_worker, shards
from feature_pipeline.cli.common import dagster_home, fail, load_settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = sub.add_parser("worker", help="a warm Celery run worker (deployments with deploy/dagster.yaml)")
    worker.add_argument("--concurrency", type=int, default=1, help="runs at once (default 1: one DuckDB writer)")
    worker.add_argument(
        "--shard",
        type=int,
        help="with FEATURE_PIPELINE_SHARDS > 1: the shard whose store this host owns; the worker serves its queue, "
        "<FEATURE_PIPELINE_CELERY_QUEUE>-shard-K (shard 0's also serves the queue itself: runs of every shard)",
    )
    worker.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    cfg = load_settings()
    if not (cfg.celery_broker and cfg.celery_backend and cfg.celery_queue):
        return fail(
            "set FEATURE_PIPELINE_CELERY_BROKER, FEATURE_PIPELINE_CELERY_BACKEND and FEATURE_PIPELINE_CELERY_QUEUE, "
            "as for the instance (see docs/deploy.md)"
        )
    home = dagster_home()
    if not (home / "dagster.yaml").is_file():
        return fail(f"no Dagster instance at {home}: copy deploy/dagster.yaml there (or set DAGSTER_HOME)")
    if cfg.shards > 1 and args.shard is None:
        return fail(f"FEATURE_PIPELINE_SHARDS={cfg.shards}: say which shard's store this worker owns, --shard K")
    shard = args.shard or 0
    try:
        shards.for_shard(cfg, shard)
    except ValueError as exc:
        return fail(f"--shard: {exc}")
    queues = [shards.queue_of(cfg.celery_queue, shard, cfg.shards)]
    if cfg.shards > 1 and shard == 0:  # runs with no shard tag (every shard, on one box) go to the queue itself
        queues.append(cfg.celery_queue)
    name = "feature-pipeline" if cfg.shards == 1 else f"feature-pipeline-shard-{shard}"
    config = _celery_config(home, cfg.celery_broker, cfg.celery_backend, name)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": _path(config, os.environ.get("PYTHONPATH"))}
    argv = [str(bin_dir / "celery"), "-A", "dagster_celery.app", "worker", "--prefetch-multiplier=1"]
    argv += ["-Q", ",".join(queues), "-c", str(args.concurrency), "-n", f"{name}@%h", "--loglevel", "INFO"]
    print(
        f"warm run worker (pid {os.getpid()}) on queue {', '.join(queues)}, DAGSTER_HOME={home}; "
        "SIGTERM lets a running run finish, then stops",
        flush=True,
    )
    os.execve(argv[0], argv, env)


def _celery_config(home: Path, broker: str, backend: str, name: str) -> Path:
    """The settings module dagster_celery's app reads (`dagster_celery_config`), in a folder of the worker's own."""
    folder = home / f"{name}-worker"
    folder.mkdir(mode=0o700, exist_ok=True)
    settings = f"broker_url = {broker!r}\nresult_backend = {backend!r}\n"
    if broker == local_worker.BROKER:  # `up --warm`: the queue is a folder under DAGSTER_HOME
        local_worker.prepare(home)
        settings += f"broker_transport_options = {local_worker.transport_options(home)!r}\n"
    module = folder / "dagster_celery_config.py"
    module.write_text(settings)
    module.chmod(0o600)
    return folder


def _path(first: Path, rest: str | None) -> str:
    return os.pathsep.join([str(first), *([rest] if rest else [])])
