"""The Dagster resource: the configuration table as one resource, each variable wired to its `EnvVar`.

`PipelineResource` gets one text config field per variable of `feature_pipeline.settings`, made
from the table, so nothing is listed twice. A value given as an environment variable reaches the
resource as an `EnvVar` (see `feature_pipeline.component`), so the UI shows where a value came
from instead of the value (credentials included). `settings` parses every field the way the CLI does.
"""

from typing import Any

import dagster as dg
from pydantic import Field, create_model

from feature_pipeline import settings as config


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
