"""feature-pipeline: NATS JetStream event streams into a DuckDB feature store, orchestrated by Dagster.

`get_features` (serving, from the online store) and `training_set` (point-in-time training data) are the
read API; `health_report` is `feature-pipeline health --json` as a dict, for a web app's own health endpoint;
`FeaturePipelineComponent` adds the pipeline to another Dagster project. Each is imported on first use, so
the code location does not pay for pandas and readers do not pay for Dagster.
"""

from typing import Any

__all__ = ["FeaturePipelineComponent", "get_features", "health_report", "training_set"]


def __getattr__(name: str) -> Any:
    if name == "get_features":
        from feature_pipeline.read.serving import get_features

        return get_features
    if name == "health_report":
        from feature_pipeline.report import health_report

        return health_report
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
