"""Fixtures: a real nats-server per test, resources for in-process ticks, and whole pipelines
(nats-server + dagster-daemon, from feature_pipeline.testing) for the end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from feature_pipeline.defs.resources import FeatureStoreResource, IngestResource, MonitoringResource, NatsResource
from feature_pipeline.localnats import LocalNats
from feature_pipeline.testing import Pipeline


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[LocalNats]:
    server = LocalNats(tmp_path / "nats").start()
    yield server
    server.kill()


@pytest.fixture
def resources(tmp_path: Path, nats_server: LocalNats) -> dict[str, Any]:
    return build_resources(tmp_path, nats_server.url)


def build_resources(tmp_path: Path, url: str) -> dict[str, Any]:
    """Resources for calling the sensor tick and the ingest asset in-process."""
    return {
        "nats": NatsResource(url=url, durable_prefix="t", max_deliver=3, ack_wait_seconds=30),
        "ingest": IngestResource(
            staging_dir=str(tmp_path / "staging"),
            batch_max_messages=1000,
            batch_max_bytes=8 * 1024 * 1024,
            max_batches_in_flight=4,
            nak_delay_seconds=1,
        ),
        "feature_store": FeatureStoreResource(
            path=str(tmp_path / "store.duckdb"), serving_path=str(tmp_path / "serving" / "user_features.parquet")
        ),
        "monitoring": MonitoringResource(
            lag_warn=100,
            lag_error=1000,
            oldest_unacked_warn_seconds=60,
            oldest_unacked_error_seconds=300,
            dead_letters_hour_warn=1,
            dead_letters_hour_error=10,
            consistency_sample=1000,
        ),
    }


@pytest.fixture
def make_pipeline(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Pipeline]]:
    made: list[Pipeline] = []

    def make(env: dict[str, str] | None = None) -> Pipeline:
        p = Pipeline(tmp_path / f"p{len(made)}", env)
        made.append(p)
        return p.start()

    yield make
    failed = getattr(request.node, "rep_call", None)
    for p in made:
        if failed is not None and failed.failed:
            print(p.diagnostics())
        p.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
