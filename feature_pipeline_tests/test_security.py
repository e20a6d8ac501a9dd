"""Authentication and TLS against real nats-servers started with them, and secrets kept out of output."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from feature_pipeline.broker import Broker, NatsAuth
from feature_pipeline.defs.resources import NatsResource
from feature_pipeline.defs.sensors import run_tick
from feature_pipeline.localnats import LocalNats
from feature_pipeline.testing import BIN, REPO, run
from feature_pipeline_tests.test_sensor_tick import _synced

SECRET = "s3cret-Pa55"


def _server(tmp_path: Path, *args: str) -> LocalNats:
    return LocalNats(tmp_path / "nats", extra_args=list(args)).start()


async def _publish_with(url: str, auth: NatsAuth) -> None:
    async with await Broker.connect(url, auth=auth) as broker:
        await broker.ensure_streams()
        subject, body = _synced("evt-secure")
        await broker.js.publish(subject, body)


def _tick(res: dict[str, Any], nats: NatsResource) -> Any:
    with dg.instance_for_test() as inst:
        return run_tick(inst, nats, res["ingest"])


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[LocalNats]:
    server = _server(tmp_path, "--user", "fp", "--pass", SECRET)
    yield server
    server.kill()


def test_user_password(auth_server: LocalNats, resources: dict[str, Any]) -> None:
    run(_publish_with(auth_server.url, NatsAuth(user="fp", password=SECRET)))
    good = NatsResource(
        url=auth_server.url, durable_prefix="t", max_deliver=3, ack_wait_seconds=30, user="fp", password=SECRET
    )
    requests, report = _tick(resources, good)
    assert report.problem is None and report.fetched == {"SIGNALS": 1} and len(requests) == 1


def test_wrong_password_is_a_clear_error_without_the_secret(auth_server: LocalNats, resources: dict[str, Any]) -> None:
    bad = NatsResource(
        url=auth_server.url,
        durable_prefix="t",
        max_deliver=3,
        ack_wait_seconds=30,
        user="fp",
        password="wrong-" + SECRET,
    )
    requests, report = _tick(resources, bad)
    assert requests == []
    assert report.problem.startswith(f"cannot reach NATS at {auth_server.url}: ")
    assert "authorization violation" in report.problem.lower()
    assert SECRET not in report.problem and SECRET not in report.summary()


def test_password_in_url_is_redacted(auth_server: LocalNats, resources: dict[str, Any]) -> None:
    url = f"nats://fp:wrong-{SECRET}@127.0.0.1:{auth_server.port}"
    _, report = _tick(resources, NatsResource(url=url, durable_prefix="t", max_deliver=3, ack_wait_seconds=30))
    assert "nats://***@127.0.0.1" in report.problem and SECRET not in report.problem


def test_token(tmp_path: Path, resources: dict[str, Any]) -> None:
    server = _server(tmp_path, "--auth", SECRET)
    try:
        run(_publish_with(server.url, NatsAuth(token=SECRET)))
        nats = NatsResource(url=server.url, durable_prefix="t", max_deliver=3, ack_wait_seconds=30, token=SECRET)
        _, report = _tick(resources, nats)
        assert report.problem is None and report.fetched == {"SIGNALS": 1}
    finally:
        server.kill()


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    d = tmp_path / "tls"
    d.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "san.ext", "-out", "server.pem")  # fmt: skip
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem"), "key": str(d / "server.key")}


def test_tls_with_the_test_ca(tmp_path: Path, tls_files: dict[str, str], resources: dict[str, Any]) -> None:
    server = _server(tmp_path, "--tls", "--tlscert", tls_files["cert"], "--tlskey", tls_files["key"])
    try:
        run(_publish_with(server.url, NatsAuth(tls_ca=tls_files["ca"])))
        trusted = NatsResource(
            url=server.url, durable_prefix="t", max_deliver=3, ack_wait_seconds=30, tls_ca=tls_files["ca"]
        )
        _, report = _tick(resources, trusted)
        assert report.problem is None and report.fetched == {"SIGNALS": 1}

        untrusted = NatsResource(url=server.url, durable_prefix="t", max_deliver=3, ack_wait_seconds=30)
        _, report = _tick(resources, untrusted)
        assert report.problem and f"cannot reach NATS at {server.url}" in report.problem
    finally:
        server.kill()


def test_settings_and_health_never_print_secrets(auth_server: LocalNats, tmp_path: Path) -> None:
    env = {
        "PATH": str(BIN),
        "NATS_URL": auth_server.url,
        "NATS_USER": "fp",
        "NATS_PASSWORD": SECRET,
        "FEATURE_STORE_PATH": str(tmp_path / "db.duckdb"),
        "FEATURE_PIPELINE_STAGING_DIR": str(tmp_path / "staging"),
        "DAGSTER_HOME": str(tmp_path / "no-dagster-home"),
    }
    shown = subprocess.run(
        [str(BIN / "feature-pipeline"), "settings"], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert shown.returncode == 0 and "NATS_PASSWORD=***" in shown.stdout
    assert SECRET not in shown.stdout + shown.stderr
    health = subprocess.run(
        [str(BIN / "feature-pipeline"), "health", "--json"], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert SECRET not in health.stdout + health.stderr
    assert json.loads(health.stdout)["nats_url"] == auth_server.url
