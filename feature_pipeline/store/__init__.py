"""The DuckDB feature store: the feature registry, the one generated feature query, and the store itself."""
