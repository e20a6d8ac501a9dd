"""`feature-pipeline health` as a user runs it (a subprocess, a real nats-server, a real Dagster instance in a
temporary DAGSTER_HOME): it never reports a state that is already over, names every reason the ingest sensor
holds off fetching, never creates the instance, and answers within its bound whatever does not answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from feature_pipeline import FeaturePipelineComponent
from feature_pipeline.broker.local import free_port, port_open, server_binary
from feature_pipeline.cli.common import prepare_dagster_home
from feature_pipeline.cli.up import create_storage
from feature_pipeline.defs.names import Names
from feature_pipeline.health import AGE_CHECK, INGEST_CHECK, LAG_CHECK
from feature_pipeline.report import HEALTH_SECONDS
from feature_pipeline.settings import Settings
from feature_pipeline.testing import BIN, REPO, run, wait_for
from feature_pipeline_tests.helpers import (
    Lifecycle,
    changed,
    definitions,
    lag,
    publish,
    redeliveries,
    resources,
    synced,
)

PREFIX = "recs"


def _env(settings: Settings, home: Path) -> dict[str, str]:
    """The environment a user's shell would have for this pipeline and instance."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "FEATURE_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home),
        NATS_URL=settings.nats_url,
        NATS_DURABLE_PREFIX=settings.durable_prefix,
        FEATURE_STORE_PATH=settings.feature_store_path,
        FEATURE_PIPELINE_STAGING_DIR=settings.staging_dir,
    )
    return env


def _health(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "feature-pipeline"), "health", "--json", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    assert "Traceback" not in done.stderr and "sqlalche" not in done.stderr, done.stderr  # no dependency internals
    return done.returncode, json.loads(done.stdout), took


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A Dagster instance made the way `up` makes it."""
    folder = tmp_path / "dagster_home"
    prepare_dagster_home(folder, REPO)
    assert create_storage(folder) is None
    return folder


def _monitor(settings: Settings, instance: dg.DagsterInstance, prefix: str = "") -> list[Any]:
    """One tick of the stream monitor, its events recorded in the instance as the daemon records them."""
    names = Names(prefix)
    sensor = definitions(settings, prefix).resolve_sensor_def(names.of("stream_monitor"))
    with dg.build_sensor_context(instance=instance, resources=resources(settings, names)) as context:
        events = list(sensor.evaluate_tick(context).asset_events or [])  # as the daemon evaluates it
    for event in events:
        instance.report_runless_asset_event(event)
    return events


def test_a_component_instance_before_and_after_its_streams_exist_never_repeats_stream_not_found(
    settings: Settings, home: Path, tmp_path: Path
) -> None:
    """A Component instance (prefix recs, from its YAML) right after it starts: its monitor ticks before its
    ingest sensor has made the streams, a WARN saying so. Even a stale ERROR of that kind (a monitor that saw
    the streams missing) is superseded by health's own live read once the sensor's first tick has made them:
    no `not found`, exit 0. The same without a prefix."""
    component = FeaturePipelineComponent.resolve_from_yaml(f"prefix: {PREFIX}\nnats_url: {settings.nats_url}\n")
    defs = component.definitions(tmp_path)
    resources = {f"{PREFIX}_pipeline": defs.resources[f"{PREFIX}_pipeline"]}
    data = tmp_path / "data" / PREFIX
    env = {
        **_env(settings, home),
        "NATS_DURABLE_PREFIX": f"feature-pipeline-{PREFIX}",
        "FEATURE_STORE_PATH": str(data / "feature_store.duckdb"),
        "FEATURE_PIPELINE_STAGING_DIR": str(data / "staging"),
    }
    with dg.DagsterInstance.from_config(str(home)) as instance:
        monitor = defs.resolve_sensor_def(f"{PREFIX}_stream_monitor")
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            early = list(monitor.evaluate_tick(context).asset_events or [])
        stream_checks = [e for e in early if isinstance(e, dg.AssetCheckEvaluation) and e.check_name in _STREAM]
        assert len(stream_checks) == 6
        assert all(e.severity == dg.AssetCheckSeverity.WARN and not e.passed for e in stream_checks)
        assert {e.description for e in stream_checks} == {
            "streams and consumers not created yet; recs_ingest_sensor creates them on its first tick"
        }
        instance.report_runless_asset_event(_stale(dg.AssetKey([PREFIX, "nats", "signals"])))
        code, before, _ = _health(env, "--prefix", PREFIX)
        assert code == 1 and any("not created yet" in p for p in before["problems"]), before["problems"]
        ingest = defs.resolve_sensor_def(f"{PREFIX}_ingest_sensor")
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            ingest.evaluate_tick(context)  # its first tick makes the streams and consumers, a moment later
    code, report, _ = _health(env, "--prefix", PREFIX)
    assert code == 0, report["problems"]
    assert "not found" not in json.dumps(report)
    assert report["checks"]["recs/nats/signals:consumer_lag"]["state"] == "superseded"
    assert [s["consumer_lag"] for s in report["streams"]] == [0, 0, 0]

    with dg.DagsterInstance.from_config(str(home)) as instance:  # no prefix: this repository's code location
        instance.report_runless_asset_event(_stale(dg.AssetKey(["nats", "signals"])))
    Lifecycle(settings).tick()
    code, plain, _ = _health(_env(settings, home))
    assert code == 0 and "not found" not in json.dumps(plain), plain["problems"]
    assert plain["checks"]["nats/signals:consumer_lag"]["state"] == "superseded"


_STREAM = (LAG_CHECK, AGE_CHECK)


def _stale(asset: dg.AssetKey) -> dg.AssetCheckEvaluation:
    """What a monitor tick recorded when it ran before the streams existed, as it did before this was fixed."""
    return dg.AssetCheckEvaluation(
        asset_key=asset,
        check_name=LAG_CHECK,
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR,
        description="NATS at nats://127.0.0.1 says a stream, consumer or bucket is missing (stream not found)",
    )


def test_a_staging_folder_too_small_for_a_batch_fails_health_and_the_check_while_no_delivery_is_spent(
    settings: Settings, home: Path, small_disk: Any
) -> None:
    """A staging folder on a 10 MiB tmpfs (a batch needs 20 MiB): the sensor holds, health exits 1 naming the
    folder and its free space, ingest_running turns ERROR with the same words, and NATS delivered nothing."""
    disk = small_disk(10)
    ours = changed(settings, staging_dir=disk / "staging")
    run(publish(ours.nats_url, [synced(f"e-{i}") for i in range(50)]))
    report = Lifecycle(ours).tick()
    assert report.problem and report.problem.startswith(f"not fetching: staging folder {disk / 'staging'} has ")
    code, health, _ = _health(_env(ours, home))
    assert code == 1
    (hold,) = [p for p in health["problems"] if "not fetching" in p]
    assert f"staging folder {disk / 'staging'} has " in hold and "MiB free; a batch needs at least 20 MiB" in hold
    with dg.DagsterInstance.from_config(str(home)) as instance:
        events = _monitor(ours, instance)
    ingest = [e for e in events if isinstance(e, dg.AssetCheckEvaluation) and e.check_name == INGEST_CHECK]
    assert ingest and all(not e.passed and e.severity == dg.AssetCheckSeverity.ERROR for e in ingest)
    assert all(hold.removeprefix("the ingest sensor is not fetching: ") in (e.description or "") for e in ingest)
    assert lag(ours)["SIGNALS"] == 50 and redeliveries(ours) == 0, "held, not fetched: no delivery spent"


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel completes them) and never answers: a partition."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def test_health_answers_within_its_bound_naming_nats_and_the_instance_database_when_both_hang(
    settings: Settings, tmp_path: Path, blackhole: int
) -> None:
    """NATS and the instance's PostgreSQL both at a port that accepts and never answers: exit 2 within the
    bound, both named, no traceback."""
    home = tmp_path / "pg_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: postgresql+psycopg2://fp@127.0.0.1:{blackhole}/dagster\n"
    )
    ours = changed(settings, nats_url=f"nats://127.0.0.1:{blackhole}")
    code, report, took = _health(_env(ours, home))
    assert code == 2 and report["status"] == "down"
    assert took < HEALTH_SECONDS + 3, f"health took {took:.1f} s"
    assert any(p.startswith(f"cannot reach NATS at nats://127.0.0.1:{blackhole}") for p in report["problems"])
    assert any(f"the Dagster instance at {home}" in p for p in report["problems"]), report["problems"]


def test_read_commands_never_create_the_instance_and_say_it_is_not_there(settings: Settings, tmp_path: Path) -> None:
    """A DAGSTER_HOME with only dagster.yaml (as `up` leaves it for a moment): health says the instance is not
    created yet and leaves the folder as it was."""
    home = tmp_path / "fresh_home"
    prepare_dagster_home(home, REPO)
    before = sorted(p.name for p in home.iterdir())
    Lifecycle(settings).tick()
    code, report, _ = _health(_env(settings, home))
    assert code == 1 and report["dagster_instance"] == "not created yet"
    assert any(f"the Dagster instance at {home} is not created yet" in p for p in report["problems"])
    assert sorted(p.name for p in home.iterdir()) == before, "nothing created"


def test_a_server_without_jetstream_is_reported_as_unavailable_not_as_missing_streams(
    settings: Settings, home: Path, tmp_path: Path
) -> None:
    """A nats-server that answers but has no JetStream (as a cluster that lost its quorum answers no JetStream
    request): health exits 2 and says JetStream is unavailable; it never says the streams are missing."""
    port = free_port()
    server = subprocess.Popen(
        [server_binary(), "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: port_open("127.0.0.1", port), 15, "nats-server without JetStream")
        ours = changed(settings, nats_url=f"nats://127.0.0.1:{port}")
        code, report, _ = _health(_env(ours, home))
    finally:
        server.kill()
        server.wait(10)
    assert code == 2
    (problem,) = [p for p in report["problems"] if "JetStream" in p]
    assert problem.startswith(f"NATS at nats://127.0.0.1:{port} answers but JetStream is unavailable there")
    assert "missing" not in problem.replace("are not missing", "") and "not created" not in json.dumps(report)
