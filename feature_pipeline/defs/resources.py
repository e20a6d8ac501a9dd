"""Dagster resources: configuration from the environment (EnvVar), typed and checked once.

A variable that is set reaches the resource as an `EnvVar`, so the Dagster UI shows where the
value came from instead of the value; an unset one falls back to the default in
`feature_pipeline.settings`, which also validated every value when the code location loaded.
"""

import os
from datetime import timedelta
from typing import Any

import dagster as dg

from feature_pipeline import settings
from feature_pipeline.broker import NatsAuth
from feature_pipeline.health import Thresholds
from feature_pipeline.registry import Registry, load_registry
from feature_pipeline.staging import Staging
from feature_pipeline.store import FeatureStore


class NatsResource(dg.ConfigurableResource):
    """Where the streams are and how the durable consumers behave."""

    url: str
    durable_prefix: str
    max_deliver: int
    ack_wait_seconds: int
    # Credentials reach the resource as EnvVars: the UI shows the variable's name, never its value.
    user: str = ""
    password: str = ""
    token: str = ""
    creds: str = ""
    nkey_seed: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    @property
    def auth(self) -> NatsAuth:
        def path(name: str, raw: str) -> str:
            return str(settings.parse(name, raw))

        return NatsAuth(
            user=self.user,
            password=self.password,
            token=self.token,
            creds=path("NATS_CREDS", self.creds),
            nkey_seed=path("NATS_NKEY_SEED", self.nkey_seed),
            tls_ca=path("NATS_TLS_CA", self.tls_ca),
            tls_cert=path("NATS_TLS_CERT", self.tls_cert),
            tls_key=path("NATS_TLS_KEY", self.tls_key),
        )


class IngestResource(dg.ConfigurableResource):
    """How the sensor cuts micro-batches and where it stages them until they are settled."""

    staging_dir: str
    batch_max_messages: int
    batch_max_bytes: int
    max_batches_in_flight: int
    nak_delay_seconds: int
    run_timeout_seconds: int = 600
    fetch_seconds: int = 8
    faults: str = ""

    @property
    def fault_set(self) -> frozenset[str]:
        """FEATURE_PIPELINE_FAULTS, for tests and drills only."""
        return frozenset(f for f in str(settings.parse("FEATURE_PIPELINE_FAULTS", self.faults)).split(",") if f)

    @property
    def staging(self) -> Staging:
        return Staging(str(settings.parse("FEATURE_PIPELINE_STAGING_DIR", self.staging_dir)))

    @property
    def max_ack_pending(self) -> int:
        # Every in-flight batch holds its messages unacked, plus the batch being fetched.
        return self.batch_max_messages * (self.max_batches_in_flight + 1)


class FeatureStoreResource(dg.ConfigurableResource):
    """The DuckDB file, the feature definitions and the serving copy."""

    path: str
    features_file: str = ""
    serving_path: str = ""
    allowed_lateness_seconds: int = 3600

    @property
    def registry(self) -> Registry:
        return load_registry(str(settings.parse("FEATURE_PIPELINE_FEATURES_FILE", self.features_file)) or None)

    @property
    def store(self) -> FeatureStore:
        serving = settings.parse("FEATURE_PIPELINE_SERVING_PATH", self.serving_path) if self.serving_path else None
        return FeatureStore(
            str(settings.parse("FEATURE_STORE_PATH", self.path)),
            registry=self.registry,
            serving_path=str(serving) if serving else None,
            allowed_lateness=timedelta(seconds=self.allowed_lateness_seconds),
        )


class MonitoringResource(dg.ConfigurableResource):
    """Thresholds of the asset checks and the freshness policy."""

    lag_warn: int
    lag_error: int
    oldest_unacked_warn_seconds: int
    oldest_unacked_error_seconds: int
    dead_letters_hour_warn: int
    dead_letters_hour_error: int
    consistency_sample: int

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(
            self.lag_warn, self.lag_error, self.oldest_unacked_warn_seconds, self.oldest_unacked_error_seconds
        )


def _env(name: str, *, integer: bool = False) -> Any:
    if name in os.environ:
        return dg.EnvVar.int(name) if integer else dg.EnvVar(name)
    return settings.parse(name, None)


def build_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "nats": NatsResource(
            url=_env("NATS_URL"),
            durable_prefix=_env("NATS_DURABLE_PREFIX"),
            max_deliver=_env("NATS_MAX_DELIVER", integer=True),
            ack_wait_seconds=_env("NATS_ACK_WAIT_SECONDS", integer=True),
            user=_env("NATS_USER"),
            password=_env("NATS_PASSWORD"),
            token=_env("NATS_TOKEN"),
            creds=_env("NATS_CREDS"),
            nkey_seed=_env("NATS_NKEY_SEED"),
            tls_ca=_env("NATS_TLS_CA"),
            tls_cert=_env("NATS_TLS_CERT"),
            tls_key=_env("NATS_TLS_KEY"),
        ),
        "ingest": IngestResource(
            staging_dir=_env("FEATURE_PIPELINE_STAGING_DIR"),
            batch_max_messages=_env("FEATURE_PIPELINE_BATCH_MAX_MESSAGES", integer=True),
            batch_max_bytes=_env("FEATURE_PIPELINE_BATCH_MAX_BYTES", integer=True),
            max_batches_in_flight=_env("FEATURE_PIPELINE_MAX_BATCHES_IN_FLIGHT", integer=True),
            nak_delay_seconds=_env("FEATURE_PIPELINE_NAK_DELAY_SECONDS", integer=True),
            run_timeout_seconds=_env("FEATURE_PIPELINE_RUN_TIMEOUT_SECONDS", integer=True),
            fetch_seconds=_env("FEATURE_PIPELINE_FETCH_SECONDS", integer=True),
            faults=_env("FEATURE_PIPELINE_FAULTS"),
        ),
        "monitoring": MonitoringResource(
            lag_warn=_env("FEATURE_PIPELINE_LAG_WARN", integer=True),
            lag_error=_env("FEATURE_PIPELINE_LAG_ERROR", integer=True),
            oldest_unacked_warn_seconds=_env("FEATURE_PIPELINE_OLDEST_UNACKED_WARN_SECONDS", integer=True),
            oldest_unacked_error_seconds=_env("FEATURE_PIPELINE_OLDEST_UNACKED_ERROR_SECONDS", integer=True),
            dead_letters_hour_warn=_env("FEATURE_PIPELINE_DEAD_LETTERS_HOUR_WARN", integer=True),
            dead_letters_hour_error=_env("FEATURE_PIPELINE_DEAD_LETTERS_HOUR_ERROR", integer=True),
            consistency_sample=_env("FEATURE_PIPELINE_CONSISTENCY_SAMPLE", integer=True),
        ),
        "feature_store": FeatureStoreResource(
            path=_env("FEATURE_STORE_PATH"),
            features_file=_env("FEATURE_PIPELINE_FEATURES_FILE"),
            serving_path=_env("FEATURE_PIPELINE_SERVING_PATH"),
            allowed_lateness_seconds=_env("FEATURE_PIPELINE_ALLOWED_LATENESS_SECONDS", integer=True),
        ),
    }
