"""The feature SQL, generated from the registry: one query for every path.

The query computes every feature for a set of (user, point in time) pairs held in the temp
table `feature_points(user_id, as_of)`, from each user's whole history in the raw event tables,
using the events with `occurred_at <= as_of` (and, for training sets that ask for it,
`received_at <= as_of`); a window w covers `(as_of - w, as_of]`. It is the reference: the daily
snapshot (every user x the day's end), the point-in-time training join (label rows x their ts)
and the consistency check (sampled rows x their own updated_at) run it, and the micro-batch
refresh (`incremental.py`, which does not read the whole history) must give the same rows.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import duckdb

from feature_pipeline.store.archive import history_view
from feature_pipeline.store.db import scalar
from feature_pipeline.store.registry import FeatureDef, Registry

POINTS = "feature_points"  # temp table (user_id VARCHAR, as_of TIMESTAMPTZ): which rows to compute


def source_tables(registry: Registry) -> dict[str, str]:
    """Each source's whole history, which the reference reads: its live table plus what was archived."""
    return {s.key: history_view(s.table) for s in registry.event_streams}


def _all_users(registry: Registry, where: str = "") -> str:
    return " UNION ".join(f"SELECT user_id FROM {t}{where}" for t in source_tables(registry).values())


LAST_KEY = "{'t': e.occurred_at, 'id': e.event_id}"  # newest by occurred_at, then event id


def interval(delta: timedelta) -> str:
    return f"INTERVAL '{int(delta.total_seconds())} seconds'"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def value(f: FeatureDef) -> str:
    """The aggregated field of event row `e`, typed."""
    assert f.field is not None
    if f.field.startswith("data."):
        path = "$." + f.field.removeprefix("data.")
        return f"TRY_CAST(e.data->>{_quote(path)} AS {f.value_type})"
    column = f"e.{f.field}"
    return column if f.type is None else f"TRY_CAST({column} AS {f.type})"


def conditions(f: FeatureDef, *, window: bool = True) -> list[str]:
    """Which rows of `e` a feature aggregates; its window is relative to the point's `p.as_of`."""
    conds = []
    if f.event_types:
        conds.append(f"e.type IN ({', '.join(_quote(t) for t in f.event_types)})")
    if f.where:
        conds.append(f"({f.where})")
    if window and f.window_delta is not None:
        conds.append(f"e.occurred_at > p.as_of - {interval(f.window_delta)}")
    return conds


def filter_clause(conds: list[str]) -> str:
    return f" FILTER (WHERE {' AND '.join(conds)})" if conds else ""


def aggregate(f: FeatureDef) -> str:
    flt = filter_clause(conditions(f))
    agg = f.aggregation
    if agg == "count":
        return f"count(e.event_id){flt}"
    v = value(f)
    if agg == "count_distinct":
        return f"count(DISTINCT {v}){flt}"
    if agg == "sum":
        return f"CAST(coalesce(sum({v}){flt}, 0) AS {f.column_type})"
    if agg == "mean":
        return f"avg({v}){flt}"
    if agg == "last":  # the newest event's value; ties on occurred_at broken by event id, not arrival order
        return f"arg_max({v}, {LAST_KEY}){flt}"
    return f"{agg}({v}){flt}"  # min, max


def column(f: FeatureDef) -> str:
    if f.aggregation == "ratio":
        return f"CASE WHEN {f.denominator} > 0 THEN CAST({f.numerator} AS DOUBLE) / {f.denominator} END"
    return f.name


def feature_sql(registry: Registry, *, received_cutoff: bool = False) -> str:
    """SELECT user_id, <features...>, as_of AS updated_at for every row of feature_points."""
    tables = source_tables(registry)
    sources = [s for s in tables if any(f.source == s for f in registry.features)]
    ctes = []
    for source in sources:
        cols = ",\n        ".join(f"{aggregate(f)} AS {f.name}" for f in registry.features if f.source == source)
        cutoff = " AND e.received_at <= p.as_of" if received_cutoff else ""
        ctes.append(
            f"src_{source} AS (\n    SELECT p.user_id, p.as_of,\n        {cols}\n"
            f"    FROM {POINTS} p\n    LEFT JOIN {tables[source]} e\n"
            f"        ON e.user_id = p.user_id AND e.occurred_at <= p.as_of{cutoff}\n"
            "    GROUP BY p.user_id, p.as_of\n)"
        )
    joins = "".join(f" JOIN src_{s} USING (user_id, as_of)" for s in sources[1:])
    cols = ",\n    ".join(f"{column(f)} AS {f.name}" for f in registry.features)
    select = f"SELECT\n    user_id,\n    {cols},\n    as_of AS updated_at\nFROM src_{sources[0]}{joins}"
    return f"WITH {', '.join(ctes)}\n{select}"


def set_points(con: duckdb.DuckDBPyConnection, select_sql: str, params: dict[str, Any] | None = None) -> None:
    """Fill feature_points from a query returning (user_id, as_of)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {POINTS} AS SELECT DISTINCT * FROM ({select_sql})", params or {})


def compute_features(
    con: duckdb.DuckDBPyConnection, registry: Registry, as_of: datetime, user_ids: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Recompute rows from the raw tables without writing: the reference for checks and tests."""
    if user_ids is None:
        set_points(
            con, f"SELECT user_id, CAST($as_of AS TIMESTAMPTZ) AS as_of FROM ({_all_users(registry)})", {"as_of": as_of}
        )
    else:
        set_points(
            con,
            "SELECT unnest($users) AS user_id, CAST($as_of AS TIMESTAMPTZ) AS as_of",
            {"users": user_ids, "as_of": as_of},
        )
    cur = con.execute(feature_sql(registry))
    names = [d[0] for d in cur.description]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


def inconsistent_users(con: duckdb.DuckDBPyConnection, sample: int, registry: Registry) -> tuple[int, list[str]]:
    """Compare up to `sample` stored rows (all when the table is smaller) with a recomputation at
    each row's own updated_at. Returns (rows checked, user ids whose row differs)."""
    rows = scalar(con, "SELECT count(*) FROM user_features")
    # SAMPLE takes only a literal (int() keeps it one) and reserves memory for all of it: cap it at the table.
    n = max(1, min(int(sample), rows))
    set_points(con, f"SELECT user_id, updated_at AS as_of FROM user_features USING SAMPLE reservoir({n} ROWS)")
    checked = int(scalar(con, f"SELECT count(*) FROM {POINTS}"))
    cols = ", ".join(("user_id", *registry.names, "updated_at"))
    diff = con.execute(
        f"SELECT user_id FROM ((SELECT {cols} FROM user_features WHERE user_id IN (SELECT user_id FROM {POINTS})) "
        f"EXCEPT ({feature_sql(registry)})) ORDER BY user_id"
    ).fetchall()
    return checked, [r[0] for r in diff]


def day_end(day: date) -> datetime:
    """The last instant of a UTC day: a snapshot of `day` counts events with occurred_at <= this."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1, microseconds=-1)


def write_snapshot(con: duckdb.DuckDBPyConnection, registry: Registry, day: date) -> int:
    """Replace the snapshot of `day`: every user with an event by the day's end, as of the day's end."""
    as_of = day_end(day)
    con.execute("DELETE FROM user_feature_snapshots WHERE snapshot_date = $d", {"d": day})
    set_points(
        con,
        "SELECT user_id, CAST($as_of AS TIMESTAMPTZ) AS as_of FROM ("
        + _all_users(registry, " WHERE occurred_at <= $as_of")
        + ")",
        {"as_of": as_of},
    )
    cols = ", ".join(registry.names)
    row = con.execute(
        f"INSERT INTO user_feature_snapshots (snapshot_date, user_id, {cols}, as_of) "
        f"SELECT $d, user_id, {cols}, updated_at FROM ({feature_sql(registry)})",
        {"d": day},
    ).fetchone()
    return int(row[0]) if row else 0
