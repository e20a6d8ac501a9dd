"""Configuration: defaults, and start-up errors that name the variable to fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from feature_pipeline import settings
from feature_pipeline.settings import MIB, Settings, SettingsError, load

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
        feature_store_path=str(tmp_path.resolve() / "data" / "feature_store.duckdb"),
        staging_dir=str(tmp_path.resolve() / "data" / "staging"),
        features_file="",
        serving_path=str(tmp_path.resolve() / "data" / "serving" / "user_features.parquet"),
        allowed_lateness_seconds=3600,
        snapshot_start="2026-01-01",
        batch_max_messages=250_000,
        batch_max_bytes=128 * MIB,
        max_batches_in_flight=4,
        sensor_interval_seconds=1,
        fetch_seconds=8,
        nak_delay_seconds=2,
        run_timeout_seconds=600,
        lag_warn=100_000,
        lag_error=1_000_000,
        oldest_unacked_warn_seconds=60,
        oldest_unacked_error_seconds=300,
        freshness_warn_seconds=900,
        freshness_fail_seconds=3600,
        dead_letters_hour_warn=100,
        dead_letters_hour_error=1000,
        consistency_sample=1000,
        faults="",
    )


def test_every_variable_has_a_field() -> None:
    """A variable without a Settings field would be read and silently dropped."""
    names = [v.name for v in settings.VARIABLES]
    assert len(names) == len(set(names))
    assert set(names) == set(settings.FIELDS)
    assert set(settings.FIELDS.values()) == set(Settings.__dataclass_fields__)


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
