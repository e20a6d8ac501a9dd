"""Configuration: defaults, and start-up errors that name the variable to fix."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_pipeline import cli, get_features, settings, shards, training_set
from feature_pipeline.broker.kv import OnlineStoreError
from feature_pipeline.broker.local import free_port
from feature_pipeline.read.serving import read_export
from feature_pipeline.settings import MIB, Settings, SettingsError, load
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.loader import DEFAULT_FILE
from feature_pipeline.testing import REPO

README = Path(__file__).parents[1] / "README.md"


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set the pipeline runs locally; relative paths resolve against the working directory."""
    monkeypatch.chdir(tmp_path)
    assert load({}) == Settings(
        nats_url="nats://127.0.0.1:4222",
        nats_user="",
        nats_password="",
        nats_token="",
        nats_creds="",
        nats_nkey_seed="",
        nats_tls_ca="",
        nats_tls_cert="",
        nats_tls_key="",
        durable_prefix="feature-pipeline",
        max_deliver=5,
        ack_wait_seconds=60,
        nats_replicas=1,
        shards=1,
        feature_store_path=str(tmp_path.resolve() / "data" / "feature_store.duckdb"),
        staging_dir=str(tmp_path.resolve() / "data" / "staging"),
        staging="folder",
        features_file="",
        serving_path=str(tmp_path.resolve() / "data" / "serving" / "user_features.parquet"),
        archive_path=str(tmp_path.resolve() / "data" / "archive"),
        archive_after_days=90,
        allowed_lateness_seconds=3600,
        snapshot_start="",
        batch_max_messages=250_000,
        batch_max_bytes=128 * MIB,
        max_batches_in_flight=4,
        sensor_interval_seconds=1,
        monitor_interval_seconds=40,
        fetch_seconds=8,
        nak_delay_seconds=2,
        run_timeout_seconds=600,
        celery_broker="",
        celery_backend="",
        celery_queue="",
        run_retention_days=7,
        lag_warn=100_000,
        lag_error=1_000_000,
        oldest_unacked_warn_seconds=60,
        oldest_unacked_error_seconds=300,
        freshness_warn_seconds=900,
        freshness_fail_seconds=3600,
        dead_letters_hour_warn=100,
        dead_letters_hour_error=1000,
        commit_latency_warn_seconds=10,
        commit_latency_error_seconds=60,
        consistency_sample=1000,
        consistency_every_seconds=300,
        faults="",
    )


def test_every_variable_has_a_field() -> None:
    """A variable without a Settings field would be read and silently dropped."""
    names = [v.name for v in settings.VARIABLES]
    assert len(names) == len(set(names))
    assert [v.field for v in settings.VARIABLES] == list(Settings.__dataclass_fields__)


def test_good_values_are_parsed(tmp_path: Path) -> None:
    """Valid overrides are parsed to their types (whitespace trimmed, lists normalised)."""
    s = load(
        {
            "NATS_URL": " nats://a:4222, tls://b:4222 ,",
            "NATS_DURABLE_PREFIX": " fp_1 ",
            "NATS_MAX_DELIVER": " 100 ",
            "FEATURE_STORE_PATH": str(tmp_path / "x" / ".." / "fs.duckdb"),
            "FEATURE_PIPELINE_BATCH_MAX_BYTES": str(2 * MIB),
            "FEATURE_PIPELINE_FAULTS": "fail-run, fail-run",
        }
    )
    assert s.nats_url == "nats://a:4222,tls://b:4222"
    assert s.durable_prefix == "fp_1"
    assert s.max_deliver == 100
    assert s.feature_store_path == str(tmp_path.resolve() / "fs.duckdb")
    assert s.batch_max_bytes == 2 * MIB
    assert s.faults == "fail-run"


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("NATS_MAX_DELIVER", "abc", ["whole number", "'abc'"]),
        ("NATS_MAX_DELIVER", "0", ["between 1 and 100"]),
        ("NATS_MAX_DELIVER", "101", ["between 1 and 100"]),
        ("NATS_MAX_DELIVER", "", ["whole number"]),
        ("NATS_ACK_WAIT_SECONDS", "5", ["between 10 and 3600"]),
        ("NATS_URL", "http://x", ["'http://x'", "NATS URL"]),
        ("NATS_URL", " , ", ["at least one server"]),
        ("NATS_DURABLE_PREFIX", "a.b", ["consumer name", "'a.b'"]),
        ("NATS_DURABLE_PREFIX", "", ["letters, digits"]),
        ("FEATURE_STORE_PATH", "  ", ["must not be empty"]),
        ("FEATURE_PIPELINE_BATCH_MAX_BYTES", "100", ["between", "100"]),
        ("FEATURE_PIPELINE_BATCH_MAX_MESSAGES", "1.5", ["whole number"]),
        ("FEATURE_PIPELINE_NAK_DELAY_SECONDS", "-1", ["between 0 and 300"]),
        ("FEATURE_PIPELINE_FAULTS", "boom", ["unknown fault", "boom", "fail-run"]),
        ("FEATURE_PIPELINE_STAGING", "s3", ["one of folder, nats", "'s3'"]),
        ("NATS_REPLICAS", "7", ["between 1 and 5"]),
        ("FEATURE_PIPELINE_CELERY_BROKER", "localhost:6379", ["Celery broker", "redis://"]),
        ("FEATURE_PIPELINE_CELERY_BROKER", "filesystem://x", ["Celery broker"]),
        ("FEATURE_PIPELINE_CELERY_BACKEND", "file://relative/path", ["result backend"]),
        ("FEATURE_PIPELINE_CELERY_QUEUE", "a queue", ["letters, digits"]),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str, words: list[str]) -> None:
    """A bad value fails at start-up with the variable's name and what is wrong with it."""
    with pytest.raises(SettingsError) as info:
        load({name: value})
    text = str(info.value)
    assert name in text
    for word in words:
        assert word in text


def test_all_problems_are_reported_together() -> None:
    """Fixing one variable only to be told about the next is slow; every problem is in one error."""
    with pytest.raises(SettingsError) as info:
        load({"NATS_MAX_DELIVER": "abc", "NATS_URL": "http://x", "FEATURE_PIPELINE_FAULTS": "boom"})
    text = str(info.value)
    assert "NATS_MAX_DELIVER" in text
    assert "NATS_URL" in text
    assert "FEATURE_PIPELINE_FAULTS" in text
    assert "NATS_DURABLE_PREFIX" not in text


def test_settings_error_is_a_value_error() -> None:
    """Callers that catch ValueError (the CLI) still see configuration problems."""
    assert issubclass(SettingsError, ValueError)


def test_every_variable_is_documented_in_readme() -> None:
    """The README's configuration table is the operator's reference; no variable may be missing from it."""
    assert README.is_file(), f"{README} does not exist"
    text = README.read_text(encoding="utf-8")
    missing = [v.name for v in settings.VARIABLES if not re.search(rf"(?<![A-Z0-9_]){v.name}(?![A-Z0-9_])", text)]
    assert missing == [], f"not documented in README.md: {missing}"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NATS_TLS_CERT": __file__}, "NATS_TLS_CERT and NATS_TLS_KEY go together"),
        ({"NATS_PASSWORD": "pw"}, "NATS_PASSWORD is set but NATS_USER is not"),
        (
            {"NATS_TLS_CA": "/nonexistent/ca.pem"},
            "NATS_TLS_CA names '/nonexistent/ca.pem', which is not a readable file",
        ),
        ({"NATS_CREDS": "/nonexistent/x.creds"}, "NATS_CREDS names"),
    ],
)
def test_security_settings_are_checked_at_start_up(env: dict[str, str], expected: str) -> None:
    with pytest.raises(settings.SettingsError, match=re.escape(expected)):
        settings.load(env)


def test_secret_variables_are_marked() -> None:
    """Marked secrets are what `feature-pipeline settings` masks."""
    assert {v.name for v in settings.VARIABLES if v.secret} == {"NATS_PASSWORD", "NATS_TOKEN"}


# -- every entry point reads the same table -----------------------------------------------------------

EXTRA_FEATURE = '\n[[feature]]\nname = "entry_point_probe"\nsource = "signals"\naggregation = "count"\n'


def _every_variable_set(tmp_path: Path) -> dict[str, str]:
    """A valid value, different from the default, for every variable of the table."""
    files = {name: tmp_path / name for name in ("creds", "seed", "ca.pem", "cert.pem", "key.pem")}
    for path in files.values():
        path.write_text("x")
    registry = tmp_path / "features.toml"
    registry.write_text(DEFAULT_FILE.read_text() + EXTRA_FEATURE)
    env = {
        "NATS_URL": "nats://10.1.2.3:4999",
        "NATS_USER": "entry-user",
        "NATS_PASSWORD": "entry-password",
        "NATS_TOKEN": "entry-token",
        "NATS_CREDS": str(files["creds"]),
        "NATS_NKEY_SEED": str(files["seed"]),
        "NATS_TLS_CA": str(files["ca.pem"]),
        "NATS_TLS_CERT": str(files["cert.pem"]),
        "NATS_TLS_KEY": str(files["key.pem"]),
        "NATS_DURABLE_PREFIX": "entry",
        "NATS_MAX_DELIVER": "7",
        "NATS_ACK_WAIT_SECONDS": "77",
        "NATS_REPLICAS": "3",
        "FEATURE_PIPELINE_SHARDS": "3",
        "FEATURE_PIPELINE_STAGING": "nats",
        "FEATURE_PIPELINE_CELERY_BROKER": "redis://10.1.2.3:6379/4",
        "FEATURE_PIPELINE_CELERY_BACKEND": "redis://10.1.2.3:6379/5",
        "FEATURE_PIPELINE_CELERY_QUEUE": "entry-queue",
        "FEATURE_PIPELINE_RUN_RETENTION_DAYS": "9",
        "FEATURE_STORE_PATH": str(tmp_path / "entry.duckdb"),
        "FEATURE_PIPELINE_STAGING_DIR": str(tmp_path / "entry-staging"),
        "FEATURE_PIPELINE_FEATURES_FILE": str(registry),
        "FEATURE_PIPELINE_SERVING_PATH": str(tmp_path / "entry-serving.parquet"),
        "FEATURE_PIPELINE_ALLOWED_LATENESS_SECONDS": "123",
        "FEATURE_PIPELINE_SNAPSHOT_START": "2026-02-03",
        "FEATURE_PIPELINE_BATCH_MAX_MESSAGES": "1234",
        "FEATURE_PIPELINE_BATCH_MAX_BYTES": str(3 * MIB),
        "FEATURE_PIPELINE_MAX_BATCHES_IN_FLIGHT": "5",
        "FEATURE_PIPELINE_SENSOR_INTERVAL_SECONDS": "2",
        "FEATURE_PIPELINE_FETCH_SECONDS": "3",
        "FEATURE_PIPELINE_MONITOR_INTERVAL_SECONDS": "17",
        "FEATURE_PIPELINE_NAK_DELAY_SECONDS": "4",
        "FEATURE_PIPELINE_RUN_TIMEOUT_SECONDS": "99",
        "FEATURE_PIPELINE_LAG_WARN": "11",
        "FEATURE_PIPELINE_LAG_ERROR": "22",
        "FEATURE_PIPELINE_OLDEST_UNACKED_WARN_SECONDS": "33",
        "FEATURE_PIPELINE_OLDEST_UNACKED_ERROR_SECONDS": "44",
        "FEATURE_PIPELINE_FRESHNESS_WARN_SECONDS": "120",
        "FEATURE_PIPELINE_FRESHNESS_FAIL_SECONDS": "240",
        "FEATURE_PIPELINE_DEAD_LETTERS_HOUR_WARN": "5",
        "FEATURE_PIPELINE_DEAD_LETTERS_HOUR_ERROR": "6",
        "FEATURE_PIPELINE_CONSISTENCY_SAMPLE": "17",
        "FEATURE_PIPELINE_CONSISTENCY_EVERY_SECONDS": "18",
        "FEATURE_PIPELINE_COMMIT_LATENCY_WARN_SECONDS": "19",
        "FEATURE_PIPELINE_COMMIT_LATENCY_ERROR_SECONDS": "29",
        "FEATURE_PIPELINE_ARCHIVE_PATH": str(tmp_path / "entry-archive"),
        "FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS": "45",
        "FEATURE_PIPELINE_FAULTS": "no-keepalive",
    }
    assert set(env) == {v.name for v in settings.VARIABLES}, "give the new variable a value here"
    defaults = load({})
    unchanged = [v.name for v in settings.VARIABLES if getattr(load(env), v.field) == getattr(defaults, v.field)]
    assert unchanged == [], "each value must differ from its default, or the test cannot see it arrive"
    return env


_CODE_LOCATION = """
import json, dagster as dg
from feature_pipeline import definitions
with dg.build_resources({"pipeline": definitions.defs.resources["pipeline"]}) as res:
    s = res.pipeline.settings
sensor = next(x for x in definitions.defs.sensors if x.name == "ingest_sensor")
monitor = next(x for x in definitions.defs.sensors if x.name == "stream_monitor")
features = definitions.defs.resolve_assets_def("user_features").specs_by_key[dg.AssetKey("user_features")]
print(json.dumps({
    "settings": {f: getattr(s, f) for f in s.__dataclass_fields__},
    "interval": sensor.minimum_interval_seconds,
    "monitor": monitor.minimum_interval_seconds,
    "snapshot_days": definitions.defs.resolve_assets_def("user_feature_snapshots").partitions_def.name,
    "freshness": str(features.freshness_policy),
}))
"""


def test_every_variable_reaches_every_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The code location (its resource and what it builds at load), the CLI, `get_features` and
    `training_set` all take their configuration from the one table: set every variable to something
    other than its default and each entry point sees it."""
    env = _every_variable_set(tmp_path)
    expected = load(env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    # The code location, loaded as the daemon loads it (a fresh process), its resource resolved by Dagster.
    out = subprocess.run([sys.executable, "-c", _CODE_LOCATION], capture_output=True, text=True, cwd=REPO, check=True)
    loaded = json.loads(out.stdout)
    assert loaded["settings"] == {f: getattr(expected, f) for f in Settings.__dataclass_fields__}
    # FEATURE_PIPELINE_SNAPSHOT_START reaches the code location in its settings (above): the days are dynamic
    # partitions that runs and ticks list from it, not a start fixed when the code location loads.
    assert loaded["interval"] == 2 and loaded["monitor"] == 17 and loaded["snapshot_days"] == "snapshot_days"
    assert "120" in loaded["freshness"] and "240" in loaded["freshness"]

    # The CLI.
    assert cli.main(["settings"]) == 0
    printed = dict(line.split("  (")[0].split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert printed == {v.name: settings.shown(expected, v) for v in settings.VARIABLES}

    # The archive command: its horizon (the cutoff it would use) and its folder.
    assert cli.main(["archive", "--dry-run"]) == 0
    cutoff = (datetime.now(UTC) - timedelta(days=45)).strftime("%Y-%m-%d")
    assert f"before {cutoff} 00:00 UTC" in capsys.readouterr().out
    assert FeatureStore.from_settings(expected).archive(expected.archive_path, timedelta(days=45)).files == 0
    assert Path(expected.archive_path).is_dir()

    # The Python read API: the online store's server and bucket, the export's path, and the store with the
    # configured feature registry.
    closed = f"nats://127.0.0.1:{free_port()}"  # not the variable's hosts: no lookup leaves this machine
    monkeypatch.setenv("NATS_URL", closed)
    bucket = f"{expected.durable_prefix}-features"
    with pytest.raises(OnlineStoreError, match=re.escape(f"NATS at {closed} for the online store {bucket}")):
        get_features(["u"])
    monkeypatch.setenv("NATS_URL", env["NATS_URL"])
    for part in shards.every_shard(expected):  # FEATURE_PIPELINE_SHARDS=3: an export part per shard
        pq.write_table(pa.table({"user_id": ["u"], "entry_point_probe": [3]}), part.serving_path)
    assert list(read_export()["entry_point_probe"]) == [3, 3, 3]
    FeatureStore.from_settings(expected).connect().close()
    labels = pa.table({"user_id": ["u"], "ts": [datetime(2026, 6, 1, tzinfo=UTC)]})
    assert "entry_point_probe" in training_set(labels).column_names, "training_set ignored the features file"
