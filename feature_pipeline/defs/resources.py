"""The Dagster resource: the configuration table as one resource, each variable wired to its `EnvVar`.

`PipelineResource` gets one text config field per variable of `feature_pipeline.settings`, made
from the table, so nothing is listed twice. A variable that is set reaches the resource as an
`EnvVar`, so the UI shows where a value came from instead of the value (credentials included);
an unset one shows its default. `settings` parses every field the way the CLI does.
"""

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg
from pydantic import Field, create_model

from feature_pipeline import settings as config

RESOURCE_KEY = "pipeline"


class PipelineResource(dg.ConfigurableResource):
    """Base of the resource class made from the configuration table (see `resource_class`)."""

    @property
    def settings(self) -> config.Settings:
        return config.from_raw({v.field: getattr(self, v.field) for v in config.VARIABLES})


def _fields() -> dict[str, Any]:
    return {v.field: (str, Field(default=v.default, description=f"{v.name}: {v.help}")) for v in config.VARIABLES}


FeaturePipelineResource: type[PipelineResource] = create_model(
    "FeaturePipelineResource", __base__=PipelineResource, __doc__="feature-pipeline's configuration.", **_fields()
)


def pipeline_resource(**values: Any) -> PipelineResource:
    """A resource with these field values (text, or `EnvVar`s); the others take their defaults."""
    return FeaturePipelineResource(**values)


def build_resources(environ: Mapping[str, str] | None = None) -> dict[str, dg.ConfigurableResource]:
    """The code location's resources: every variable that is set arrives as its `EnvVar`; an unset one
    as its default, resolved here (relative paths against this process's working directory)."""
    env = os.environ if environ is None else environ
    defaults = config.from_raw({})
    values = {
        v.field: dg.EnvVar(v.name) if v.name in env else str(getattr(defaults, v.field)) for v in config.VARIABLES
    }
    return {RESOURCE_KEY: pipeline_resource(**values)}
