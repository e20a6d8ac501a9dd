"""Fixtures: a real nats-server per test, settings that point everything at the test's own folder,
whole pipelines (nats-server + dagster-daemon, from feature_pipeline.testing) for the end-to-end
tests, and a guard that fails a test which leaves Dagster's load context pointing at a dead instance."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
