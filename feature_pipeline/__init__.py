"""feature-pipeline: NATS JetStream event streams into a DuckDB feature store, orchestrated by Dagster.

`get_features` (serving) and `training_set` (point-in-time training data) are the read API;
`FeaturePipelineComponent` adds the pipeline to another Dagster project. Each is imported on
first use, so the code location does not pay for pandas and readers do not pay for Dagster.
"""

from typing import Any

__all__ = ["FeaturePipelineComponent", "get_features", "training_set"]


def __getattr__(name: str) -> Any:
    if name == "get_features":
        from feature_pipeline.read.serving import get_features

        return get_features
    if name == "training_set":
        from feature_pipeline.read.training import training_set

        return training_set
    if name == "FeaturePipelineComponent":  # `type: feature_pipeline.FeaturePipelineComponent` in a defs.yaml
        from feature_pipeline.component import FeaturePipelineComponent

        return FeaturePipelineComponent
    raise AttributeError(name)


def __dir__() -> list[str]:
    """The lazy names too: `dg`'s component registry lists a module's attributes."""
    return sorted({*globals(), *__all__})
