"""Authentication and TLS against real nats-servers started with them, and secrets kept out of output."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from feature_pipeline.broker import topology
from feature_pipeline.broker.auth import NatsAuth
from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.local import LocalNats
from feature_pipeline.ingest.report import TickReport
from feature_pipeline.settings import Settings
from feature_pipeline.streams import PACKAGED
from feature_pipeline.testing import BIN, REPO, run
from feature_pipeline_tests.helpers import Lifecycle, changed, synced

SECRET = "s3cret-Pa55"


def _server(root: Path, *args: str) -> LocalNats:
    return LocalNats(root / "nats", extra_args=list(args)).start()


async def _publish_with(url: str, auth: NatsAuth) -> None:
    async with await Broker.connect(url, auth=auth) as broker:
        await topology.ensure_streams(broker, PACKAGED)
        subject, body = synced("evt-secure")
        await broker.js.publish(subject, body)


def _tick(settings: Settings, url: str, **auth: str) -> TickReport:
    """One tick against `url` with these credentials (settings fields such as nats_user, nats_tls_ca)."""
    return Lifecycle(changed(settings, nats_url=url, **auth)).tick()


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[LocalNats]:
    server = _server(tmp_path / "auth", "--user", "fp", "--pass", SECRET)
    yield server
    server.kill()


def test_user_password(auth_server: LocalNats, settings: Settings) -> None:
    run(_publish_with(auth_server.url, NatsAuth(user="fp", password=SECRET)))
    report = _tick(settings, auth_server.url, nats_user="fp", nats_password=SECRET)
    assert report.problem is None and report.fetched == {"SIGNALS": 1} and len(report.to_request) == 1


def test_wrong_password_is_a_clear_error_without_the_secret(auth_server: LocalNats, settings: Settings) -> None:
    report = _tick(settings, auth_server.url, nats_user="fp", nats_password="wrong-" + SECRET)
    assert report.to_request == []
    assert report.problem.startswith(f"cannot reach NATS at {auth_server.url}: ")
    assert "authorization violation" in report.problem.lower()
    assert SECRET not in report.problem and SECRET not in report.summary()


def test_password_in_url_is_redacted(auth_server: LocalNats, settings: Settings) -> None:
    url = f"nats://fp:wrong-{SECRET}@127.0.0.1:{auth_server.port}"
    report = _tick(settings, url)
    assert "nats://***@127.0.0.1" in report.problem and SECRET not in report.problem


def test_token(tmp_path: Path, settings: Settings) -> None:
    server = _server(tmp_path / "token", "--auth", SECRET)
    try:
        run(_publish_with(server.url, NatsAuth(token=SECRET)))
        report = _tick(settings, server.url, nats_token=SECRET)
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


def test_tls_with_the_test_ca(tmp_path: Path, tls_files: dict[str, str], settings: Settings) -> None:
    server = _server(tmp_path / "tls-nats", "--tls", "--tlscert", tls_files["cert"], "--tlskey", tls_files["key"])
    try:
        run(_publish_with(server.url, NatsAuth(tls_ca=tls_files["ca"])))
        report = _tick(settings, server.url, nats_tls_ca=tls_files["ca"])
        assert report.problem is None and report.fetched == {"SIGNALS": 1}

        report = _tick(settings, server.url)
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
