"""Every environment variable the pipeline reads, in one place.

The code location, the run workers and the CLI all go through `load()`, so a bad
value fails at start-up with a message that names the variable instead of
surfacing later as a stack trace inside a sensor tick. The README's
configuration table is checked against `VARIABLES` by a test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path

MIB = 1024 * 1024


class SettingsError(ValueError):
    """One or more environment variables hold values the pipeline cannot use."""


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    help: str
    parse: Callable[[str], object]
    secret: bool = False  # never printed, logged or shown in the UI


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _nats_url(raw: str) -> str:
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    if not urls:
        raise ValueError("must name at least one server, e.g. nats://127.0.0.1:4222")
    for url in urls:
        if not re.match(r"^(nats|tls|ws|wss)://[^/\s]+$", url):
            raise ValueError(f"{url!r} is not a NATS URL like nats://host:4222")
    return ",".join(urls)


def _consumer_prefix(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,200}", value):
        raise ValueError(
            f"must be letters, digits, '-' or '_' (it becomes part of a JetStream consumer name), got {raw!r}"
        )
    return value


def _path(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return str(Path(raw.strip()).expanduser().resolve())


FAULTS = {
    "fail-run": "every ingest run fails just before COMMIT",
    "slow-commit": "every ingest run waits 10 s inside its transaction before COMMIT (to kill or cancel it there)",
    "no-keepalive": "the sensor sends no +WPI, so ack_wait can expire under a waiting batch",
}


def _optional_file(raw: str) -> str:
    if not raw.strip():
        return ""
    path = Path(raw.strip()).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"names {str(path)!r}, which is not a readable file")
    return str(path)


def _features_file(raw: str) -> str:
    from feature_pipeline.registry import RegistryError, load_registry  # pydantic + duckdb: only when needed

    path = _optional_file(raw)
    try:
        load_registry(path or None)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None
    return path


def _day(raw: str) -> str:
    try:
        return date.fromisoformat(raw.strip()).isoformat()
    except ValueError:
        raise ValueError(f"must be a date like 2026-01-01, got {raw!r}") from None


def _text(raw: str) -> str:
    return raw


def _faults(raw: str) -> str:
    known = set(FAULTS)
    names = {f.strip() for f in raw.split(",") if f.strip()}
    unknown = names - known
    if unknown:
        raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {sorted(known)}")
    return ",".join(sorted(names))


VARIABLES: tuple[Variable, ...] = (
    Variable("NATS_URL", "nats://127.0.0.1:4222", "NATS server URL(s), comma separated.", _nats_url),
    Variable("NATS_USER", "", "User name for NATS user/password authentication.", _text),
    Variable("NATS_PASSWORD", "", "Password for NATS user/password authentication.", _text, secret=True),
    Variable("NATS_TOKEN", "", "Token for NATS token authentication.", _text, secret=True),
    Variable("NATS_CREDS", "", "Path of a NATS credentials file (JWT + NKey seed).", _optional_file),
    Variable("NATS_NKEY_SEED", "", "Path of a file holding an NKey seed.", _optional_file),
    Variable("NATS_TLS_CA", "", "Path of the CA certificate(s) that signed the server's certificate.", _optional_file),
    Variable("NATS_TLS_CERT", "", "Path of a client certificate, for servers that verify clients.", _optional_file),
    Variable("NATS_TLS_KEY", "", "Path of the client certificate's private key.", _optional_file),
    Variable(
        "NATS_DURABLE_PREFIX",
        "feature-pipeline",
        "Prefix of the durable consumers `<prefix>-signals`, `<prefix>-feedback`, `<prefix>-deadletter`.",
        _consumer_prefix,
    ),
    Variable(
        "NATS_MAX_DELIVER",
        "5",
        "Deliveries a message gets before it is dead-lettered (1-100).",
        _int_between(1, 100),
    ),
    Variable(
        "NATS_ACK_WAIT_SECONDS",
        "60",
        "Consumer ack_wait. In-flight batches are kept alive with +WPI every quarter of it, so this only "
        "matters when the sensor is down (10-3600).",
        _int_between(10, 3600),
    ),
    Variable(
        "FEATURE_STORE_PATH",
        "./data/feature_store.duckdb",
        "The DuckDB feature store file.",
        _path,
    ),
    Variable(
        "FEATURE_PIPELINE_STAGING_DIR",
        "./data/staging",
        "Where fetched batches are staged (Parquet + manifest) until their run is settled.",
        _path,
    ),
    Variable(
        "FEATURE_PIPELINE_FEATURES_FILE",
        "",
        "A feature registry TOML file to use instead of the packaged feature_pipeline/feature_defs.toml "
        "(checked when the code location loads).",
        _features_file,
    ),
    Variable(
        "FEATURE_PIPELINE_SERVING_PATH",
        "./data/serving/user_features.parquet",
        "The read-only Parquet copy of user_features that every successful run replaces atomically; "
        "`feature_pipeline.get_features` reads it.",
        _path,
    ),
    Variable(
        "FEATURE_PIPELINE_ALLOWED_LATENESS_SECONDS",
        "3600",
        "An event stored more than this long after its occurred_at is counted as late in the run's metadata "
        "(it is stored and counted in features all the same) (0-31536000).",
        _int_between(0, 31_536_000),
    ),
    Variable(
        "FEATURE_PIPELINE_SNAPSHOT_START",
        "2026-01-01",
        "First day (UTC, YYYY-MM-DD) of the daily partitions of user_feature_snapshots.",
        _day,
    ),
    Variable(
        "FEATURE_PIPELINE_BATCH_MAX_MESSAGES",
        "250000",
        "Most messages in one micro-batch (one Dagster run), staged in pulls of 20 000, so the sensor holds one "
        "pull in memory (1-1000000).",
        _int_between(1, 1_000_000),
    ),
    Variable(
        "FEATURE_PIPELINE_BATCH_MAX_BYTES",
        str(128 * MIB),
        "Most payload bytes in one micro-batch; must exceed the server's max_payload (2 MiB-1 GiB).",
        _int_between(2 * MIB, 1024 * MIB),
    ),
    Variable(
        "FEATURE_PIPELINE_MAX_BATCHES_IN_FLIGHT",
        "4",
        "Staged batches waiting for or in a run before the sensor stops fetching (1-100).",
        _int_between(1, 100),
    ),
    Variable(
        "FEATURE_PIPELINE_SENSOR_INTERVAL_SECONDS",
        "1",
        "Minimum seconds from the end of one sensor tick to the start of the next. The daemon checks every 5 s, "
        "so 1 means a tick every 5 s; 5 would mean every 10 s (1-3600).",
        _int_between(1, 3600),
    ),
    Variable(
        "FEATURE_PIPELINE_FETCH_SECONDS",
        "8",
        "A sensor tick starts no pull that would end later than this many seconds after the tick began (settling "
        "included), so it ends before the daemon's second 5 s loop and its runs are requested; the next tick goes "
        "on (1-50).",
        _int_between(1, 50),
    ),
    Variable(
        "FEATURE_PIPELINE_NAK_DELAY_SECONDS",
        "2",
        "Redelivery delay after a failed run; doubles with each delivery, capped at 300 s (0-300).",
        _int_between(0, 300),
    ),
    Variable(
        "FEATURE_PIPELINE_RUN_TIMEOUT_SECONDS",
        "600",
        "An ingest run still going after this long is failed by Dagster's run monitoring (tag dagster/max_runtime), "
        "so a run whose worker was killed releases its batch for redelivery (10-86400).",
        _int_between(10, 86400),
    ),
    Variable(
        "FEATURE_PIPELINE_LAG_WARN",
        "100000",
        "Asset check consumer_lag on each stream warns above this many unacked or pending messages.",
        _int_between(0, 10**12),
    ),
    Variable(
        "FEATURE_PIPELINE_LAG_ERROR",
        "1000000",
        "... and fails (ERROR) above this many.",
        _int_between(0, 10**12),
    ),
    Variable(
        "FEATURE_PIPELINE_OLDEST_UNACKED_WARN_SECONDS",
        "60",
        "Asset check oldest_unacked_age warns when the oldest message not yet acked is older than this.",
        _int_between(1, 10**7),
    ),
    Variable(
        "FEATURE_PIPELINE_OLDEST_UNACKED_ERROR_SECONDS",
        "300",
        "... and fails (ERROR) when older than this.",
        _int_between(1, 10**7),
    ),
    Variable(
        "FEATURE_PIPELINE_FRESHNESS_WARN_SECONDS",
        "900",
        "user_features freshness policy: WARN when not materialized for this long (the producer syncs every 15 min; "
        "Dagster's minimum is 60).",
        _int_between(60, 10**7),
    ),
    Variable(
        "FEATURE_PIPELINE_FRESHNESS_FAIL_SECONDS",
        "3600",
        "... and FAIL when not materialized for this long (must exceed the WARN window).",
        _int_between(60, 10**7),
    ),
    Variable(
        "FEATURE_PIPELINE_DEAD_LETTERS_HOUR_WARN",
        "100",
        "Asset check dead_letters_last_hour warns above this many dead letters in the last hour.",
        _int_between(0, 10**9),
    ),
    Variable(
        "FEATURE_PIPELINE_DEAD_LETTERS_HOUR_ERROR",
        "1000",
        "... and fails (ERROR) above this many.",
        _int_between(0, 10**9),
    ),
    Variable(
        "FEATURE_PIPELINE_CONSISTENCY_SAMPLE",
        "1000",
        "Rows of user_features the matches_recomputation check compares with a recomputation on every ingest run.",
        _int_between(1, 10**7),
    ),
    Variable(
        "FEATURE_PIPELINE_FAULTS",
        "",
        "Fault injection for tests and drills only, comma separated: "
        + "; ".join(f"`{k}`: {v}" for k, v in FAULTS.items()),
        _faults,
    ),
)

_BY_NAME = {v.name: v for v in VARIABLES}
# (warn variable, error variable, warn must be strictly below): Dagster's freshness policy needs strict.
_WARN_BELOW_ERROR = (
    ("FEATURE_PIPELINE_LAG_WARN", "FEATURE_PIPELINE_LAG_ERROR", False),
    ("FEATURE_PIPELINE_OLDEST_UNACKED_WARN_SECONDS", "FEATURE_PIPELINE_OLDEST_UNACKED_ERROR_SECONDS", False),
    ("FEATURE_PIPELINE_FRESHNESS_WARN_SECONDS", "FEATURE_PIPELINE_FRESHNESS_FAIL_SECONDS", True),
    ("FEATURE_PIPELINE_DEAD_LETTERS_HOUR_WARN", "FEATURE_PIPELINE_DEAD_LETTERS_HOUR_ERROR", False),
)


@dataclass(frozen=True)
class Settings:
    nats_url: str
    nats_user: str
    nats_password: str
    nats_token: str
    nats_creds: str
    nats_nkey_seed: str
    nats_tls_ca: str
    nats_tls_cert: str
    nats_tls_key: str
    durable_prefix: str
    max_deliver: int
    ack_wait_seconds: int
    feature_store_path: str
    staging_dir: str
    features_file: str
    serving_path: str
    allowed_lateness_seconds: int
    snapshot_start: str
    batch_max_messages: int
    batch_max_bytes: int
    max_batches_in_flight: int
    sensor_interval_seconds: int
    fetch_seconds: int
    nak_delay_seconds: int
    run_timeout_seconds: int
    lag_warn: int
    lag_error: int
    oldest_unacked_warn_seconds: int
    oldest_unacked_error_seconds: int
    freshness_warn_seconds: int
    freshness_fail_seconds: int
    dead_letters_hour_warn: int
    dead_letters_hour_error: int
    consistency_sample: int
    faults: str


FIELDS = {
    "NATS_URL": "nats_url",
    "NATS_USER": "nats_user",
    "NATS_PASSWORD": "nats_password",
    "NATS_TOKEN": "nats_token",
    "NATS_CREDS": "nats_creds",
    "NATS_NKEY_SEED": "nats_nkey_seed",
    "NATS_TLS_CA": "nats_tls_ca",
    "NATS_TLS_CERT": "nats_tls_cert",
    "NATS_TLS_KEY": "nats_tls_key",
    "NATS_DURABLE_PREFIX": "durable_prefix",
    "NATS_MAX_DELIVER": "max_deliver",
    "NATS_ACK_WAIT_SECONDS": "ack_wait_seconds",
    "FEATURE_STORE_PATH": "feature_store_path",
    "FEATURE_PIPELINE_STAGING_DIR": "staging_dir",
    "FEATURE_PIPELINE_FEATURES_FILE": "features_file",
    "FEATURE_PIPELINE_SERVING_PATH": "serving_path",
    "FEATURE_PIPELINE_ALLOWED_LATENESS_SECONDS": "allowed_lateness_seconds",
    "FEATURE_PIPELINE_SNAPSHOT_START": "snapshot_start",
    "FEATURE_PIPELINE_BATCH_MAX_MESSAGES": "batch_max_messages",
    "FEATURE_PIPELINE_BATCH_MAX_BYTES": "batch_max_bytes",
    "FEATURE_PIPELINE_MAX_BATCHES_IN_FLIGHT": "max_batches_in_flight",
    "FEATURE_PIPELINE_SENSOR_INTERVAL_SECONDS": "sensor_interval_seconds",
    "FEATURE_PIPELINE_FETCH_SECONDS": "fetch_seconds",
    "FEATURE_PIPELINE_NAK_DELAY_SECONDS": "nak_delay_seconds",
    "FEATURE_PIPELINE_RUN_TIMEOUT_SECONDS": "run_timeout_seconds",
    "FEATURE_PIPELINE_LAG_WARN": "lag_warn",
    "FEATURE_PIPELINE_LAG_ERROR": "lag_error",
    "FEATURE_PIPELINE_OLDEST_UNACKED_WARN_SECONDS": "oldest_unacked_warn_seconds",
    "FEATURE_PIPELINE_OLDEST_UNACKED_ERROR_SECONDS": "oldest_unacked_error_seconds",
    "FEATURE_PIPELINE_FRESHNESS_WARN_SECONDS": "freshness_warn_seconds",
    "FEATURE_PIPELINE_FRESHNESS_FAIL_SECONDS": "freshness_fail_seconds",
    "FEATURE_PIPELINE_DEAD_LETTERS_HOUR_WARN": "dead_letters_hour_warn",
    "FEATURE_PIPELINE_DEAD_LETTERS_HOUR_ERROR": "dead_letters_hour_error",
    "FEATURE_PIPELINE_CONSISTENCY_SAMPLE": "consistency_sample",
    "FEATURE_PIPELINE_FAULTS": "faults",
}


def parse(name: str, raw: str | None) -> object:
    """Parse one variable's raw value (None = unset, so the default)."""
    var = _BY_NAME[name]
    return var.parse(var.default if raw is None else raw)


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check every variable; all problems are reported together."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    problems: list[str] = []
    for var in VARIABLES:
        raw = env.get(var.name)
        try:
            values[FIELDS[var.name]] = parse(var.name, raw)
        except ValueError as exc:
            problems.append(f"{var.name} {exc}")
    for warn, error, strict in _WARN_BELOW_ERROR:
        w, e = values.get(FIELDS[warn]), values.get(FIELDS[error])
        if w is not None and e is not None and (w >= e if strict else w > e):  # type: ignore[operator]
            problems.append(f"{warn} ({w}) must be {'below' if strict else 'at most'} {error} ({e})")
    if bool(values.get("nats_tls_cert")) != bool(values.get("nats_tls_key")):
        problems.append("NATS_TLS_CERT and NATS_TLS_KEY go together: set both or neither")
    if values.get("nats_password") and not values.get("nats_user"):
        problems.append("NATS_PASSWORD is set but NATS_USER is not")
    if problems:
        raise SettingsError("invalid configuration: " + "; ".join(problems))
    return Settings(**values)  # type: ignore[arg-type]
