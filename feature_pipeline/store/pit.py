"""The point-in-time join for training sets: every label row with the features as they were at its ts.

A label's all-time features need every event before its ts. Joining each label to its user's whole
history costs labels-per-user x events-per-user rows (10 x 1 000 at 1 M labels over 100 M events), so
the history up to the earliest label, t0, is aggregated once into per-user partials (the same mergeable
partials the batch path keeps), and only the events after t0 - the longest window are joined to the
labels; each label merges the partials with its own later events. The result equals the reference
query (`features.feature_sql`), which still serves the `received_at` cut-off and all-time
count_distinct features (a distinct count does not merge from counts).
"""

from __future__ import annotations

from datetime import datetime

import duckdb

from feature_pipeline.store.archive import history_view
from feature_pipeline.store.db import scalar
from feature_pipeline.store.features import POINTS, aggregate, column, feature_sql, set_points
from feature_pipeline.store.incremental import all_time, final, longest_window, parts
from feature_pipeline.store.registry import Registry


def point_in_time(
    con: duckdb.DuckDBPyConnection,
    registry: Registry,
    labels: str,
    *,
    received_cutoff: bool = False,
    keep_row: bool = False,
) -> duckdb.DuckDBPyRelation:
    """Every row of the table `labels(user_id, ts, ...)`, in its order (its `__row` column, kept with
    `keep_row`: shards' parts are merged by it), with the features as they were at its ts."""
    set_points(con, f"SELECT user_id, ts AS as_of FROM {labels}")
    t0 = scalar(con, f"SELECT min(as_of) FROM {POINTS}")
    distinct = any(f.aggregation == "count_distinct" and f.window_delta is None for f in registry.features)
    params: dict[str, datetime] = {}
    if received_cutoff or distinct or t0 is None:
        sql = feature_sql(registry, received_cutoff=received_cutoff)
    else:
        sql, params = _from_partials(con, registry, t0)
    con.execute(f"CREATE OR REPLACE TEMP TABLE pit_features AS {sql}", params)
    cols = ", ".join(f"f.{n}" for n in registry.names)
    return con.sql(
        f"SELECT l.*{'' if keep_row else ' EXCLUDE (__row)'}, {cols} FROM {labels} l "
        "LEFT JOIN pit_features f ON f.user_id = l.user_id AND f.updated_at = l.ts ORDER BY l.__row"
    )


def _from_partials(con: duckdb.DuckDBPyConnection, registry: Registry, t0: datetime) -> tuple[str, dict[str, datetime]]:
    """The query, after writing each source's partials up to t0 for the labels' users to temp tables."""
    params: dict[str, datetime] = {"t0": t0}
    ctes, joins = [], []
    for spec in registry.event_streams:
        src, history = spec.key, history_view(spec.table)
        feats = [f for f in registry.features if f.source == src]
        if not feats:
            continue
        base = [p for f in all_time(registry, src) for p in parts(f)]
        later = [p for f in all_time(registry, src) for p in parts(f, ("e.occurred_at > $t0",))]
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE pit_base_{src} AS SELECT e.user_id"
            + "".join(f", {p.aggregate} AS {p.column}" for p in base)
            + f" FROM {history} e WHERE e.occurred_at <= $t0 AND e.user_id IN (SELECT user_id FROM {POINTS}) "
            "GROUP BY e.user_id",
            {"t0": t0},
        )
        window = longest_window(registry, src)
        params[f"lo_{src}"] = t0 - window if window is not None else t0
        windowed = "".join(f", {aggregate(f)} AS {f.name}" for f in feats if f.window_delta is not None)
        deltas = "".join(f", {p.aggregate} AS {p.column}" for p in later)
        ctes.append(
            f"d_{src} AS (SELECT p.user_id, p.as_of{windowed}{deltas} FROM {POINTS} p LEFT JOIN "
            f"(SELECT * FROM {history} WHERE occurred_at > $lo_{src}) e "
            "ON e.user_id = p.user_id AND e.occurred_at <= p.as_of GROUP BY p.user_id, p.as_of)"
        )
        merged = "".join(f", {p.merge} AS {p.column}" for p in later)
        keep = "".join(f", d.{f.name}" for f in feats if f.window_delta is not None)
        ctes.append(
            f"s_{src} AS (SELECT d.user_id, d.as_of{keep}{merged} FROM d_{src} d "
            f"LEFT JOIN pit_base_{src} s ON s.user_id = d.user_id)"
        )
        joins.append(src)
    first, rest = joins[0], joins[1:]
    using = "".join(f" JOIN s_{s} USING (user_id, as_of)" for s in rest)
    values = ", ".join(
        f"{f'{final(f)}' if f.window_delta is None else f's_{f.source}.{f.name}'} AS {f.name}"
        for f in registry.features
        if f.aggregation != "ratio"
    )
    outer = ", ".join(f"{column(f)} AS {f.name}" for f in registry.features)
    return (
        f"WITH {', '.join(ctes)}, base AS (SELECT s_{first}.user_id, s_{first}.as_of, {values} FROM s_{first}{using}) "
        f"SELECT user_id, {outer}, as_of AS updated_at FROM base",
        params,
    )
