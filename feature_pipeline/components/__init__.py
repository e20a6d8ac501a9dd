"""The `dg` project's folder for Dagster Components (`defs_module` in pyproject.toml); none yet.

This project's own definitions are plain modules in `feature_pipeline.defs`, assembled by
`feature_pipeline.definitions`; dg loads them from there.
"""
