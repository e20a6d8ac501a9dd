"""The production shape on this machine: the Dagster instance on PostgreSQL, runs on a warm Celery worker
(Redis broker and result backend) with a scratch folder of its own, batches staged in NATS. Real
processes throughout: the daemon, `feature-pipeline worker`, nats-server, PostgreSQL, Redis. Skipped,
saying why, where PostgreSQL or Redis is not there. (Killing the whole worker and waiting for the
max-runtime backstop is in scripts/multihost_check.py: it takes longer than the suite can spend.)"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from feature_pipeline.samples import publish_events
from feature_pipeline.testing import REPO, Pipeline, pool_children, run, wait_for

CELERY_TASK_TAG = "dagster-celery/task_id"
SUBJECTS = ["signals.task.synced", "signals.task.completed", "feedback.recommendation.shown"]


def deployment(make_pipeline: Any, postgres_url: str, redis_url: str, **env: str) -> Pipeline:
    """A pipeline on deploy/dagster.yaml: PostgreSQL instance, Celery launcher, batches staged in NATS."""
    return make_pipeline(
        {
            "DAGSTER_POSTGRES_URL": postgres_url,
            "FEATURE_PIPELINE_CELERY_BROKER": redis_url,
            "FEATURE_PIPELINE_CELERY_BACKEND": redis_url,
            "FEATURE_PIPELINE_CELERY_QUEUE": f"fp-test-{uuid.uuid4().hex[:8]}",  # nothing else serves it
            "FEATURE_PIPELINE_STAGING": "nats",
            **env,
        },
        instance_yaml=REPO / "deploy" / "dagster.yaml",
    )


@pytest.mark.e2e
def test_postgres_instance_warm_worker_and_shared_staging(
    make_pipeline: Any, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Runs on a worker that shares no folder with the sensor store every event once; a run whose pool
    process is killed mid-transaction fails (run monitoring reads the task's state from the result
    backend), its batch comes back, and the worker's new pool process stores it once."""
    p = deployment(make_pipeline, postgres_url, redis_url)
    worker = p.start_worker(FEATURE_PIPELINE_STAGING_DIR=str(tmp_path / "worker-host"))
    first = run(publish_events(p.nats.url, subjects=SUBJECTS, users=["u-1", "u-2", "u-3"], count=40, rate=None))
    wait_for(lambda: sorted(p.stored_ids()) == sorted(first) and p.settled(), 120, "the first events stored")
    runs = p.runs(dg.DagsterRunStatus.SUCCESS)
    assert runs and all(CELERY_TASK_TAG in r.tags for r in runs), "every run went to the Celery worker"
    assert not list(p.staging.rglob("*.parquet")), "the sensor's own folder holds no batch files"

    # A slow commit leaves time to kill the pool process inside the transaction.
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(10)
    slow = p.start_worker(
        FEATURE_PIPELINE_STAGING_DIR=str(tmp_path / "worker-host"), FEATURE_PIPELINE_FAULTS="slow-commit"
    )
    second = run(publish_events(p.nats.url, subjects=SUBJECTS, users=["u-1", "u-2"], count=10, rate=None))
    killed = wait_for(lambda: p.runs(dg.DagsterRunStatus.STARTED), 90, "a run on the slow worker")[0]
    (child,) = wait_for(lambda: pool_children(slow.pid), 10, "the worker's pool process")
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: p.run_status(killed.run_id) == dg.DagsterRunStatus.FAILURE, 60, "run monitoring to fail it")
    os.killpg(slow.pid, signal.SIGKILL)
    slow.wait(10)
    p.start_worker(FEATURE_PIPELINE_STAGING_DIR=str(tmp_path / "worker-host"))
    published = first + second
    wait_for(lambda: sorted(p.stored_ids()) == sorted(published) and p.settled(), 120, "every event stored once")
    assert p.query("SELECT sum(signal_count_total) FROM user_features") == [
        (len(p.query("SELECT 1 FROM signal_events")),)
    ]


@pytest.mark.parametrize("section", ["concurrency", "run_monitoring", "retention", "sensors", "telemetry"])
def test_the_deployment_instance_keeps_the_single_box_settings(section: str) -> None:
    """deploy/dagster.yaml differs from dagster.yaml only where a deployment must (storage, coordinator,
    launcher): the pools, run monitoring, retention and sensor threads stay the same."""
    import yaml

    single, deployed = (yaml.safe_load((REPO / name).read_text()) for name in ("dagster.yaml", "deploy/dagster.yaml"))
    assert deployed[section] == single[section]
    assert set(deployed) - set(single) == {"storage", "run_coordinator", "run_launcher"}
