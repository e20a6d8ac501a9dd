"""The configuration table: every variable the pipeline reads, defined once.

Each field of `Settings` carries its environment variable, default, help text and parser. From
this one table come the Dagster resource (one config field per variable, wired to `EnvVar`s),
the CLI, the Python read API (`get_features`, `training_set`), `feature-pipeline settings` and
the README check. A bad value fails at start-up with a message that names the variable instead
of surfacing later as a stack trace inside a sensor tick; every problem is reported at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import Any

from feature_pipeline import faults
from feature_pipeline.broker.auth import NatsAuth, redact

MIB = 1024 * 1024
_META = "feature_pipeline.variable"


class SettingsError(ValueError):
    """One or more variables hold values the pipeline cannot use."""


@dataclass(frozen=True)
class Variable:
    name: str  # the environment variable
    field: str  # the Settings attribute, resource config field and CLI key
    default: str
    help: str
    parse: Callable[[str], object]
    secret: bool = False  # never printed, logged or shown in the UI


# -- parsers ---------------------------------------------------------------------------------


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


def _optional_file(raw: str) -> str:
    if not raw.strip():
        return ""
    path = Path(raw.strip()).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"names {str(path)!r}, which is not a readable file")
    return str(path)


def _features_file(raw: str) -> str:
    from feature_pipeline.store.loader import RegistryError, load_registry  # pydantic + duckdb: only when needed

    path = _optional_file(raw)
    try:
        load_registry(path or None)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None
    return path


CELERY_URL = r"^((redis|rediss|amqp|amqps|pyamqp|sqla\+[a-z0-9+]+)://|filesystem://$|file:///)"


def _celery_url(raw: str) -> str:
    """A network broker or backend; or, for `up --warm` on one machine, Celery's folder transport and file backend."""
    value = raw.strip()
    if value and not re.match(CELERY_URL, value):
        raise ValueError(f"must be a Celery broker or result backend URL like redis://host:6379/0, got {raw!r}")
    return value


def _queue(raw: str) -> str:
    value = raw.strip()
    if value and not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", value):
        raise ValueError(f"must be letters, digits, '.', '-' or '_', got {raw!r}")
    return value


def _day(raw: str) -> str:
    if not raw.strip():
        return ""
    try:
        return date.fromisoformat(raw.strip()).isoformat()
    except ValueError:
        raise ValueError(f"must be a date like 2026-01-01, got {raw!r}") from None


def _text(raw: str) -> str:
    return raw


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _faults(raw: str) -> str:
    return ",".join(sorted(faults.parse(raw)))


def _var(name: str, default: str, help: str, parse: Callable[[str], object], *, secret: bool = False) -> Any:
    return field(metadata={_META: (name, default, help, parse, secret)})


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Every setting, parsed and checked; build it with `load()`."""

    nats_url: str = _var("NATS_URL", "nats://127.0.0.1:4222", "NATS server URL(s), comma separated.", _nats_url)
    nats_user: str = _var("NATS_USER", "", "User name for NATS user/password authentication.", _text)
    nats_password: str = _var(
        "NATS_PASSWORD", "", "Password for NATS user/password authentication.", _text, secret=True
    )
    nats_token: str = _var("NATS_TOKEN", "", "Token for NATS token authentication.", _text, secret=True)
    nats_creds: str = _var("NATS_CREDS", "", "Path of a NATS credentials file (JWT + NKey seed).", _optional_file)
    nats_nkey_seed: str = _var("NATS_NKEY_SEED", "", "Path of a file holding an NKey seed.", _optional_file)
    nats_tls_ca: str = _var(
        "NATS_TLS_CA", "", "Path of the CA certificate(s) that signed the server's certificate.", _optional_file
    )
    nats_tls_cert: str = _var(
        "NATS_TLS_CERT", "", "Path of a client certificate, for servers that verify clients.", _optional_file
    )
    nats_tls_key: str = _var("NATS_TLS_KEY", "", "Path of the client certificate's private key.", _optional_file)
    durable_prefix: str = _var(
        "NATS_DURABLE_PREFIX",
        "feature-pipeline",
        "Prefix of the durable consumers `<prefix>-signals`, `<prefix>-feedback`, `<prefix>-deadletter`.",
        _consumer_prefix,
    )
    max_deliver: int = _var(
        "NATS_MAX_DELIVER", "5", "Deliveries a message gets before it is dead-lettered (1-100).", _int_between(1, 100)
    )
    ack_wait_seconds: int = _var(
        "NATS_ACK_WAIT_SECONDS",
        "60",
        "Consumer ack_wait. In-flight batches are kept alive with +WPI every quarter of it, so this only "
        "matters when the sensor is down (10-3600).",
        _int_between(10, 3600),
    )
    nats_replicas: int = _var(
        "NATS_REPLICAS",
        "1",
        "Replicas of the streams, and of the staging buckets, that the pipeline creates: 3 on a three-node NATS "
        "cluster (1-5). Streams that exist already keep theirs.",
        _int_between(1, 5),
    )
    feature_store_path: str = _var(
        "FEATURE_STORE_PATH", "./data/feature_store.duckdb", "The DuckDB feature store file.", _path
    )
    shards: int = _var(
        "FEATURE_PIPELINE_SHARDS",
        "1",
        "Stores the users are split across, each its own DuckDB file, staged batches and single writer, so runs "
        "of different shards store in parallel (on one host or several); a user's shard is crc32(user_id) mod N. "
        "1 is one store at FEATURE_STORE_PATH; N > 1 keeps `<name>.shard-K-of-N.duckdb` beside it. A change of N "
        "is refused until `feature-pipeline reshard` has moved the users (1-64).",
        _int_between(1, 64),
    )
    staging_dir: str = _var(
        "FEATURE_PIPELINE_STAGING_DIR",
        "./data/staging",
        "Where fetched batches are staged (Parquet + manifest) until their run is settled.",
        _path,
    )
    staging: str = _var(
        "FEATURE_PIPELINE_STAGING",
        "folder",
        "Where staged batches live until settled: `folder` (FEATURE_PIPELINE_STAGING_DIR, on one host: the sensor "
        "and the runs share its disk) or `nats` (the NATS object store, so runs and sensors on other hosts reach them; "
        "FEATURE_PIPELINE_STAGING_DIR is then each host's scratch folder).",
        _choice("folder", "nats"),
    )
    features_file: str = _var(
        "FEATURE_PIPELINE_FEATURES_FILE",
        "",
        "A feature registry TOML file to use instead of the packaged feature_pipeline/feature_defs.toml "
        "(checked when the code location loads).",
        _features_file,
    )
    serving_path: str = _var(
        "FEATURE_PIPELINE_SERVING_PATH",
        "./data/serving/user_features.parquet",
        "The Parquet export of user_features for bulk readers (`read_export`), written atomically by "
        "`feature-pipeline export` or the export_user_features job; point lookups read the online store instead.",
        _path,
    )
    archive_path: str = _var(
        "FEATURE_PIPELINE_ARCHIVE_PATH",
        "./data/archive",
        "Where `feature-pipeline archive` (and the schedule archive_raw_events) writes raw events older than "
        "FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS, as Parquet partitioned by day; the store keeps reading them there.",
        _path,
    )
    archive_after_days: int = _var(
        "FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS",
        "90",
        "Raw events that occurred more than this many days ago may be archived; must exceed the longest feature "
        "window (1-36500).",
        _int_between(1, 36_500),
    )
    allowed_lateness_seconds: int = _var(
        "FEATURE_PIPELINE_ALLOWED_LATENESS_SECONDS",
        "3600",
        "An event stored more than this long after its occurred_at is counted as late in the run's metadata "
        "(it is stored and counted in features all the same) (0-31536000).",
        _int_between(0, 31_536_000),
    )
    snapshot_start: str = _var(
        "FEATURE_PIPELINE_SNAPSHOT_START",
        "",
        "First day (UTC, YYYY-MM-DD) user_feature_snapshots offers to snapshot and backfill. Empty: the day of the "
        "earliest event the store holds (kept in `<FEATURE_STORE_PATH>.first-day`, moved earlier when older events "
        "arrive); no day until the store holds an event. The days run to yesterday and are added as they come.",
        _day,
    )
    batch_max_messages: int = _var(
        "FEATURE_PIPELINE_BATCH_MAX_MESSAGES",
        "250000",
        "Most messages in one micro-batch (one Dagster run), staged in pulls of 20 000, so the sensor holds one "
        "pull in memory (1-1000000).",
        _int_between(1, 1_000_000),
    )
    batch_max_bytes: int = _var(
        "FEATURE_PIPELINE_BATCH_MAX_BYTES",
        str(128 * MIB),
        "Most payload bytes in one micro-batch; must exceed the server's max_payload (2 MiB-1 GiB).",
        _int_between(2 * MIB, 1024 * MIB),
    )
    max_batches_in_flight: int = _var(
        "FEATURE_PIPELINE_MAX_BATCHES_IN_FLIGHT",
        "4",
        "Staged batches waiting for or in a run before the sensor stops fetching (1-100).",
        _int_between(1, 100),
    )
    sensor_interval_seconds: int = _var(
        "FEATURE_PIPELINE_SENSOR_INTERVAL_SECONDS",
        "1",
        "Minimum seconds from the end of one sensor tick to the start of the next. The daemon checks every 5 s, "
        "so 1 means a tick every 5 s; 5 would mean every 10 s (1-3600).",
        _int_between(1, 3600),
    )
    monitor_interval_seconds: int = _var(
        "FEATURE_PIPELINE_MONITOR_INTERVAL_SECONDS",
        "40",
        "Seconds between stream_monitor ticks, which observe the streams and grade the lag checks and "
        "ingest_running; the UI plots the last 100 observations, so 40 keeps an hour of history (5-3600).",
        _int_between(5, 3600),
    )
    fetch_seconds: int = _var(
        "FEATURE_PIPELINE_FETCH_SECONDS",
        "8",
        "A sensor tick starts no pull that would end later than this many seconds after the tick began (settling "
        "included), so it ends before the daemon's second 5 s loop and its runs are requested; the next tick goes "
        "on (1-50).",
        _int_between(1, 50),
    )
    nak_delay_seconds: int = _var(
        "FEATURE_PIPELINE_NAK_DELAY_SECONDS",
        "2",
        "First delay after a failed run: before a message its run failed is redelivered (NAK), and before a "
        "batch whose run failed outside its messages is run again; doubles each time, capped at 300 s (0-300).",
        _int_between(0, 300),
    )
    run_timeout_seconds: int = _var(
        "FEATURE_PIPELINE_RUN_TIMEOUT_SECONDS",
        "600",
        "An ingest run still going after this long is failed by Dagster's run monitoring (tag dagster/max_runtime), "
        "so a run whose worker was killed releases its batch for redelivery (10-86400).",
        _int_between(10, 86400),
    )
    celery_broker: str = _var(
        "FEATURE_PIPELINE_CELERY_BROKER",
        "",
        "Celery broker of the warm run workers (deploy/dagster.yaml, `feature-pipeline worker`), e.g. "
        "redis://host:6379/0; unset on a single box (`up --warm` sets its own filesystem://).",
        _celery_url,
    )
    celery_backend: str = _var(
        "FEATURE_PIPELINE_CELERY_BACKEND",
        "",
        "Celery result backend, the same for the launcher and every worker (run monitoring reads task states "
        "from it), e.g. redis://host:6379/0.",
        _celery_url,
    )
    celery_queue: str = _var(
        "FEATURE_PIPELINE_CELERY_QUEUE",
        "",
        "The Celery queue the runs are sent to, e.g. feature-pipeline; exactly one worker, of concurrency 1, serves "
        "it, on the host that owns the DuckDB file.",
        _queue,
    )
    run_retention_days: int = _var(
        "FEATURE_PIPELINE_RUN_RETENTION_DAYS",
        "7",
        "The schedule prune_ingest_runs deletes succeeded ingest runs older than this many days, failed and canceled "
        "ones older than four times as many, with their logs and the materializations they recorded (1-3650).",
        _int_between(1, 3650),
    )
    lag_warn: int = _var(
        "FEATURE_PIPELINE_LAG_WARN",
        "100000",
        "Asset check consumer_lag on each stream warns above this many unacked or pending messages.",
        _int_between(0, 10**12),
    )
    lag_error: int = _var(
        "FEATURE_PIPELINE_LAG_ERROR", "1000000", "... and fails (ERROR) above this many.", _int_between(0, 10**12)
    )
    oldest_unacked_warn_seconds: int = _var(
        "FEATURE_PIPELINE_OLDEST_UNACKED_WARN_SECONDS",
        "60",
        "Asset check oldest_unacked_age warns when the oldest message not yet acked is older than this.",
        _int_between(1, 10**7),
    )
    oldest_unacked_error_seconds: int = _var(
        "FEATURE_PIPELINE_OLDEST_UNACKED_ERROR_SECONDS",
        "300",
        "... and fails (ERROR) when older than this.",
        _int_between(1, 10**7),
    )
    freshness_warn_seconds: int = _var(
        "FEATURE_PIPELINE_FRESHNESS_WARN_SECONDS",
        "900",
        "user_features freshness policy: WARN when not materialized for this long (the producer syncs every 15 min; "
        "Dagster's minimum is 60).",
        _int_between(60, 10**7),
    )
    freshness_fail_seconds: int = _var(
        "FEATURE_PIPELINE_FRESHNESS_FAIL_SECONDS",
        "3600",
        "... and FAIL when not materialized for this long (must exceed the WARN window).",
        _int_between(60, 10**7),
    )
    dead_letters_hour_warn: int = _var(
        "FEATURE_PIPELINE_DEAD_LETTERS_HOUR_WARN",
        "100",
        "Asset check dead_letters_last_hour warns above this many dead letters in the last hour.",
        _int_between(0, 10**9),
    )
    dead_letters_hour_error: int = _var(
        "FEATURE_PIPELINE_DEAD_LETTERS_HOUR_ERROR",
        "1000",
        "... and fails (ERROR) above this many.",
        _int_between(0, 10**9),
    )
    commit_latency_warn_seconds: int = _var(
        "FEATURE_PIPELINE_COMMIT_LATENCY_WARN_SECONDS",
        "10",
        "Asset check commit_latency warns when a batch stored in the last 10 minutes had a p95 publish→commit "
        "latency (JetStream stored time to DuckDB commit) above this (1-86400).",
        _int_between(1, 86_400),
    )
    commit_latency_error_seconds: int = _var(
        "FEATURE_PIPELINE_COMMIT_LATENCY_ERROR_SECONDS",
        "60",
        "... and fails (ERROR) above this (1-86400).",
        _int_between(1, 86_400),
    )
    consistency_sample: int = _var(
        "FEATURE_PIPELINE_CONSISTENCY_SAMPLE",
        "1000",
        "Rows of user_features the matches_recomputation check compares with a recomputation from the whole history.",
        _int_between(1, 10**7),
    )
    consistency_every_seconds: int = _var(
        "FEATURE_PIPELINE_CONSISTENCY_EVERY_SECONDS",
        "300",
        "How often an ingest run makes that comparison (it reads every stored event, so its cost grows with the "
        "history); runs in between report the last one and when it was made. 0: every run.",
        _int_between(0, 10**7),
    )
    faults: str = _var(
        "FEATURE_PIPELINE_FAULTS",
        "",
        "Fault injection for tests and drills only, comma separated: "
        + "; ".join(f"`{k}`: {v}" for k, v in faults.FAULTS.items()),
        _faults,
    )

    @property
    def nats_auth(self) -> NatsAuth:
        return NatsAuth(
            user=self.nats_user,
            password=self.nats_password,
            token=self.nats_token,
            creds=self.nats_creds,
            nkey_seed=self.nats_nkey_seed,
            tls_ca=self.nats_tls_ca,
            tls_cert=self.nats_tls_cert,
            tls_key=self.nats_tls_key,
        )

    @property
    def fault_set(self) -> frozenset[str]:
        return faults.parse(self.faults)

    @property
    def max_ack_pending(self) -> int:
        """Every in-flight batch of every shard holds its messages unacked, plus the batches being fetched."""
        return self.batch_max_messages * self.shards * (self.max_batches_in_flight + 1)


PATH_PARSERS = (_path, _optional_file, _features_file)  # values that name a file or folder
VARIABLES: tuple[Variable, ...] = tuple(
    Variable(f.metadata[_META][0], f.name, *f.metadata[_META][1:]) for f in fields(Settings)
)
BY_NAME = {v.name: v for v in VARIABLES}
# (warn variable, error variable, warn must be strictly below): Dagster's freshness policy needs strict.
_WARN_BELOW_ERROR = (
    ("lag_warn", "lag_error", False),
    ("oldest_unacked_warn_seconds", "oldest_unacked_error_seconds", False),
    ("freshness_warn_seconds", "freshness_fail_seconds", True),
    ("dead_letters_hour_warn", "dead_letters_hour_error", False),
    ("commit_latency_warn_seconds", "commit_latency_error_seconds", False),
)


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Every variable from the environment (unset ones take their defaults), checked together."""
    env = os.environ if environ is None else environ
    return from_raw({v.field: env[v.name] for v in VARIABLES if v.name in env})


def from_raw(raw: Mapping[str, str]) -> Settings:
    """Settings from raw text values keyed by field name (missing fields take their defaults)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for var in VARIABLES:
        text = raw.get(var.field)
        try:
            values[var.field] = var.parse(var.default if text is None else text)
        except ValueError as exc:
            problems.append(f"{var.name} {exc}")
    problems += _cross_checks(values)
    if problems:
        raise SettingsError("invalid configuration: " + "; ".join(problems))
    return Settings(**values)


def _cross_checks(values: Mapping[str, Any]) -> list[str]:
    problems = []
    names = {v.field: v.name for v in VARIABLES}
    for warn, error, strict in _WARN_BELOW_ERROR:
        w, e = values.get(warn), values.get(error)
        if w is not None and e is not None and (w >= e if strict else w > e):
            problems.append(f"{names[warn]} ({w}) must be {'below' if strict else 'at most'} {names[error]} ({e})")
    if bool(values.get("nats_tls_cert")) != bool(values.get("nats_tls_key")):
        problems.append("NATS_TLS_CERT and NATS_TLS_KEY go together: set both or neither")
    if values.get("nats_password") and not values.get("nats_user"):
        problems.append("NATS_PASSWORD is set but NATS_USER is not")
    return problems


def shown(settings: Settings, var: Variable) -> str:
    """A value as it may be printed: secrets masked, credentials in URLs redacted."""
    value = getattr(settings, var.field)
    if var.secret and value:
        return "***"
    return redact(str(value)) if var.field == "nats_url" else str(value)
