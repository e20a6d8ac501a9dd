"""The Dagster Component: the whole pipeline, configured in YAML, once or several times in one project.

    type: feature_pipeline.FeaturePipelineComponent
    attributes:
      prefix: recs
      nats_url: nats://nats-1:4222,nats://nats-2:4222
      nats_password: {env: NATS_PASSWORD}

Every attribute but `prefix` is a field of the configuration table (`feature_pipeline.settings`),
so the YAML covers exactly what the environment variables cover. A value is literal text or
`{env: NAME}`: the resource then holds `EnvVar(NAME)`, which every process that uses it (runs on
other hosts included) reads from its own environment, and the UI shows the variable's name, never
a credential; the secrets of the table are accepted only that way. An attribute left out takes the
table's default; in a prefixed instance the store, staging, serving and archive paths default to
`data/<prefix>/…` under the project and the durable consumers to `feature-pipeline-<prefix>-…`, so
two instances share no file and no consumer unless told to.

This repository's own code location is the same Component without a prefix, built from the
environment (`from_environment`): one path for both.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self, cast

import dagster as dg
from pydantic import Field, create_model

from feature_pipeline import settings as config
from feature_pipeline.defs.build import build_definitions
from feature_pipeline.defs.names import Names
from feature_pipeline.defs.resources import pipeline_resource
from feature_pipeline.store.loader import sources_for

# Defaults that would make two instances share a file or a consumer: per prefix, under data/<prefix>/.
_PER_INSTANCE = {
    "feature_store_path": "feature_store.duckdb",
    "staging_dir": "staging",
    "serving_path": "serving/user_features.parquet",
    "archive_path": "archive",
}


class EnvRef(dg.Model):
    """An environment variable, read where the value is used."""

    env: str = Field(description="Name of the environment variable.")


Value = str | int | float | EnvRef


class _Pipeline(dg.Component, dg.Model, dg.Resolvable):
    """feature-pipeline: NATS JetStream signals and feedback into a DuckDB feature store, acked after the run
    that stored them succeeded. Attributes: `prefix`, and any field of the configuration table."""

    prefix: str = Field(
        default="",
        description="Begins this instance's asset keys (<prefix>/user_features), job, sensor, schedule and pool "
        "names (<prefix>_ingest): two instances in one project need different prefixes.",
    )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Self:
        """No prefix; every variable that is set is referenced by name (`{env: NAME}`)."""
        env = os.environ if environ is None else environ
        refs: dict[str, Any] = {v.field: EnvRef(env=v.name) for v in config.VARIABLES if v.name in env}
        return cls(**refs)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return self.definitions(Path(context.project_root))

    def definitions(self, root: Path | None = None) -> dg.Definitions:
        """Checks every value now, so a bad one fails the code location's load with its name."""
        values = self.resource_values(root)
        where = f"feature_pipeline component with prefix {self.prefix!r}" if self.prefix else "feature_pipeline"
        problems = [
            f"{f} names {v.env_var_name}, which is not set"
            for f, v in values.items()
            if isinstance(v, dg.EnvVar) and v.env_var_name not in os.environ
        ]
        problems += [
            f"{v.field} is a secret: give it as {{env: NAME}}, so the UI shows the variable's name, not the value"
            for v in config.VARIABLES
            if v.secret and getattr(self, v.field) is not None and not isinstance(getattr(self, v.field), EnvRef)
        ]
        if problems:
            raise config.SettingsError(f"{where}: " + "; ".join(problems))
        try:
            settings = config.from_raw(
                {f: os.environ[v.env_var_name] if isinstance(v, dg.EnvVar) else v for f, v in values.items()}
            )
        except config.SettingsError as exc:
            raise config.SettingsError(f"{where}: {exc}") from None
        names = Names(self.prefix, sources_for(settings.features_file))  # the registry was checked by from_raw
        return build_definitions(names, pipeline_resource(**values), settings)

    def resource_values(self, root: Path | None = None) -> dict[str, str | dg.EnvVar]:
        """Each field as the resource holds it: an `EnvVar`, or text (relative paths made absolute against
        the project's root, or this process's working directory without one)."""
        base = (root or Path.cwd()).resolve()
        values: dict[str, str | dg.EnvVar] = {}
        for var in config.VARIABLES:
            given = getattr(self, var.field)
            if isinstance(given, EnvRef):
                values[var.field] = dg.EnvVar(given.env)
                continue
            text = self._default(var) if given is None else str(given)
            if var.parse in config.PATH_PARSERS and text.strip():
                text = str((base / Path(text.strip()).expanduser()).resolve())
            values[var.field] = text
        return values

    def _default(self, var: config.Variable) -> str:
        if not self.prefix:
            return var.default
        if var.field in _PER_INSTANCE:
            return f"data/{self.prefix}/{_PER_INSTANCE[var.field]}"
        if var.field == "durable_prefix":
            return f"{var.default}-{self.prefix}"
        return var.default


def _fields() -> dict[str, Any]:
    return {
        v.field: (Value | None, Field(default=None, description=f"{v.help} (environment variable {v.name})"))
        for v in config.VARIABLES
    }


FeaturePipelineComponent = cast(
    type[_Pipeline],
    create_model(
        "FeaturePipelineComponent", __base__=_Pipeline, __module__=__name__, __doc__=_Pipeline.__doc__, **_fields()
    ),
)
