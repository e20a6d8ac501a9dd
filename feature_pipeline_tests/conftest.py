"""Fixtures: a real nats-server per test, settings that point everything at the test's own folder,
whole pipelines (nats-server + dagster-daemon, from feature_pipeline.testing) for the end-to-end
tests, and a guard that fails a test which leaves Dagster's load context pointing at a dead instance."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from feature_pipeline.broker.local import LocalNats
from feature_pipeline.settings import Settings
from feature_pipeline.testing import Pipeline
from feature_pipeline_tests.helpers import Lifecycle, settings_for


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[LocalNats]:
    server = LocalNats(tmp_path / "nats").start()
    yield server
    server.kill()


@pytest.fixture
def settings(tmp_path: Path, nats_server: LocalNats) -> Settings:
    return settings_for(tmp_path, nats_server.url)


@pytest.fixture
def lifecycle(settings: Settings) -> Lifecycle:
    return Lifecycle(settings)


@pytest.fixture
def make_pipeline(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Pipeline]]:
    made: list[Pipeline] = []

    def make(env: dict[str, str] | None = None, **kwargs: Any) -> Pipeline:
        p = Pipeline(tmp_path / f"p{len(made)}", env, **kwargs)
        made.append(p)
        return p.start()

    yield make
    failed = getattr(request.node, "rep_call", None)
    for p in made:
        if failed is not None and failed.failed:
            print(p.diagnostics())
        p.close()


ADMIN_POSTGRES = os.environ.get(
    "FEATURE_PIPELINE_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
REDIS = os.environ.get("FEATURE_PIPELINE_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """A real filesystem of a given size (tmpfs), for disk-full tests; skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(where)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a {mib} MiB tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database of this test's own on the machine's PostgreSQL (FEATURE_PIPELINE_TEST_POSTGRES, a libpq
    connection string to an account that may create databases), dropped afterwards; skipped without one."""
    import psycopg2

    try:
        admin = psycopg2.connect(ADMIN_POSTGRES, connect_timeout=3)
    except psycopg2.Error as exc:
        pytest.skip(f"no PostgreSQL at {ADMIN_POSTGRES!r}: {str(exc).strip()}")
    admin.autocommit = True
    name = f"fp_test_{uuid.uuid4().hex[:12]}"
    params = admin.get_dsn_parameters()
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{params['user']}@{params['host']}:{params['port']}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis (FEATURE_PIPELINE_TEST_REDIS), for Celery; skipped without one."""
    parsed = urlparse(REDIS)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        pytest.skip(f"no Redis at {REDIS}: {exc}")
    if not answer.startswith(b"+PONG"):
        pytest.skip(f"no Redis at {REDIS}: it answered {answer!r}")
    return REDIS


@pytest.fixture(autouse=True)
def _dagster_load_context_is_left_clean() -> Iterator[None]:
    """A Dagster instance entered and never exited (e.g. the one `build_schedule_context(...).instance`
    opens when the context is not used in a `with` block) leaves a suspended generator that, whenever the
    garbage collector gets to it, points Dagster's current defs-state storage at an instance that is gone;
    the next `materialize` anywhere then fails. Collect now and load a definition, so the test that leaked
    fails, not a random later one."""
    yield
    if "dagster" not in sys.modules:
        return
    import dagster as dg

    gc.collect()

    @dg.asset
    def probe() -> None:
        return None

    try:
        dg.Definitions(assets=[probe]).resolve_all_job_defs()
    except Exception as exc:  # DagsterInvariantViolationError, or the dead instance's storage is gone
        pytest.fail(f"this test left Dagster's load context bound to a disposed instance: {exc!r}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
