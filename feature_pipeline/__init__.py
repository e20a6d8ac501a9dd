"""feature-pipeline: NATS JetStream event streams into a DuckDB feature store, orchestrated by Dagster.

`get_features` (serving) and `training_set` (point-in-time training data) are the read API;
they are imported on first use so the code location does not pay for pandas at import.
"""

from typing import Any

__all__ = ["get_features", "training_set"]


def __getattr__(name: str) -> Any:
    if name == "get_features":
        from feature_pipeline.read.serving import get_features

        return get_features
    if name == "training_set":
        from feature_pipeline.read.training import training_set

        return training_set
    raise AttributeError(name)
