"""The names one pipeline instance gives its Dagster objects, so two instances in one project never collide.

This repository's own code location has no prefix: asset keys `nats/signals`, `user_features`, job
`ingest`, sensor `ingest_sensor`, pool `duckdb`, resource `pipeline`. An instance with prefix `recs`
(the Component's `prefix` attribute) has `recs/nats/signals`, `recs/user_features`, `recs_ingest`,
`recs_ingest_sensor`, pool `recs_duckdb` and resource `recs_pipeline`. DuckDB table names do not
change: each instance has its own store file.
"""

import re
from dataclasses import dataclass
from typing import Any

import dagster as dg

from feature_pipeline.defs.resources import PipelineResource
from feature_pipeline.settings import Settings
from feature_pipeline.streams import PACKAGED, StreamSpec, by_name, with_dead_letters

_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,30}")


@dataclass(frozen=True)
class Names:
    prefix: str = ""
    sources: tuple[StreamSpec, ...] = PACKAGED  # the registry's: one asset nats/<source> and table each

    def __post_init__(self) -> None:
        if self.prefix and not _PREFIX.fullmatch(self.prefix):
            raise ValueError(
                f"prefix must be lowercase letters, digits and underscores, starting with a letter, at most 31 "
                f"characters (it begins asset keys, job, sensor and pool names), got {self.prefix!r}"
            )

    def asset(self, *path: str) -> dg.AssetKey:
        return dg.AssetKey([self.prefix, *path] if self.prefix else list(path))

    @property
    def streams(self) -> tuple[StreamSpec, ...]:
        """The sources and the dead-letter stream."""
        return with_dead_letters(self.sources)

    def by_name(self, stream: str) -> StreamSpec:
        """A stream by its JetStream name; ValueError when it is not one of this instance's."""
        found = by_name(self.sources).get(stream)
        if found is None:
            raise ValueError(f"{stream!r} is not one of the streams {', '.join(by_name(self.sources))}")
        return found

    def stream(self, spec: StreamSpec) -> dg.AssetKey:
        return self.asset("nats", spec.key)

    def table(self, name: str) -> dg.AssetKey:
        """A DuckDB table's asset (`user_features`, `signal_events`, …)."""
        return self.asset(name)

    @property
    def user_features(self) -> dg.AssetKey:
        return self.table("user_features")

    def of(self, base: str) -> str:
        """A job, sensor, schedule, op or pool name."""
        return f"{self.prefix}_{base}" if self.prefix else base

    @property
    def resource_key(self) -> str:
        return self.of("pipeline")

    @property
    def pool(self) -> str:
        """Ingest, snapshot, replay, redrive and archive runs hold it: one writer per DuckDB file."""
        return self.of("duckdb")

    @property
    def ingest_job(self) -> str:
        return self.of("ingest")

    @property
    def ingest_sensor(self) -> str:
        return self.of("ingest_sensor")

    def settings(self, context: Any) -> Settings:
        """This instance's settings, from its resource (any Dagster context with resources)."""
        resource: PipelineResource = getattr(context.resources, self.resource_key)
        return resource.settings


# What `dg.define_asset_job` (and a schedule built from its partitions) returns; not public classes.
AssetJob = Any


def one_op_job(names: Names, op: dg.OpDefinition, node: str, job: str, description: str) -> dg.JobDefinition:
    """A job of one op, under the instance's name; the node keeps an unprefixed name, so run config
    (`ops: {<node>: ...}`) reads the same in every instance. In process: one op needs no subprocess."""

    @dg.job(name=names.of(job), executor_def=dg.in_process_executor, description=description)
    def one() -> None:
        op.alias(node)()

    return one
