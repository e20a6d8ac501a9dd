"""The feature SQL: `user_features` for (user, point in time) pairs, from the raw event tables.

One query serves every path, so they cannot drift apart: the incremental update of the
users a batch touched (their ids x the run's clock), the full recomputation (every user x
now), and the consistency check (sampled rows x their own `updated_at`). Every feature of a
row is computed as of its point in time `as_of` from events with `occurred_at <= as_of`;
windows are `(as_of - window, as_of]`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb

FEATURE_COLUMNS: tuple[str, ...] = (
    "user_id",
    "signal_count_total",
    "signal_count_24h",
    "signal_count_7d",
    "task_synced_count_7d",
    "latest_tasks_total",
    "latest_tasks_completed",
    "rec_shown_7d",
    "rec_accepted_7d",
    "rec_dismissed_7d",
    "rec_acceptance_rate_7d",
    "last_signal_at",
    "last_feedback_at",
    "updated_at",
)

USER_FEATURES_DDL = """
CREATE TABLE IF NOT EXISTS user_features (
    user_id VARCHAR PRIMARY KEY,
    signal_count_total BIGINT NOT NULL,
    signal_count_24h BIGINT NOT NULL,
    signal_count_7d BIGINT NOT NULL,
    task_synced_count_7d BIGINT NOT NULL,
    latest_tasks_total BIGINT,
    latest_tasks_completed BIGINT,
    rec_shown_7d BIGINT NOT NULL,
    rec_accepted_7d BIGINT NOT NULL,
    rec_dismissed_7d BIGINT NOT NULL,
    rec_acceptance_rate_7d DOUBLE,
    last_signal_at TIMESTAMPTZ,
    last_feedback_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL
)
"""

POINTS = "feature_points"  # temp table (user_id VARCHAR, as_of TIMESTAMPTZ): which rows to compute

_FEATURE_SQL = f"""
WITH s AS (
    SELECT
        p.user_id,
        p.as_of,
        count(e.event_id) AS signal_count_total,
        count(e.event_id) FILTER (WHERE e.occurred_at > p.as_of - INTERVAL 24 HOUR) AS signal_count_24h,
        count(e.event_id) FILTER (WHERE e.occurred_at > p.as_of - INTERVAL 7 DAY) AS signal_count_7d,
        count(e.event_id) FILTER (WHERE e.type = 'task.synced' AND e.occurred_at > p.as_of - INTERVAL 7 DAY)
            AS task_synced_count_7d,
        arg_max(CAST(e.data->>'tasks_total' AS BIGINT), (e.occurred_at, e.event_id))
            FILTER (WHERE e.type = 'task.synced') AS latest_tasks_total,
        arg_max(CAST(e.data->>'tasks_completed' AS BIGINT), (e.occurred_at, e.event_id))
            FILTER (WHERE e.type = 'task.synced') AS latest_tasks_completed,
        max(e.occurred_at) AS last_signal_at
    FROM {POINTS} p
    LEFT JOIN signal_events e ON e.user_id = p.user_id AND e.occurred_at <= p.as_of
    GROUP BY p.user_id, p.as_of
),
f AS (
    SELECT
        p.user_id,
        p.as_of,
        count(e.event_id) FILTER (
            WHERE e.type = 'recommendation.shown' AND e.occurred_at > p.as_of - INTERVAL 7 DAY) AS rec_shown_7d,
        count(e.event_id) FILTER (
            WHERE e.type = 'recommendation.accepted' AND e.occurred_at > p.as_of - INTERVAL 7 DAY) AS rec_accepted_7d,
        count(e.event_id) FILTER (
            WHERE e.type = 'recommendation.dismissed' AND e.occurred_at > p.as_of - INTERVAL 7 DAY)
            AS rec_dismissed_7d,
        max(e.occurred_at) AS last_feedback_at
    FROM {POINTS} p
    LEFT JOIN feedback_events e ON e.user_id = p.user_id AND e.occurred_at <= p.as_of
    GROUP BY p.user_id, p.as_of
)
SELECT
    s.user_id,
    s.signal_count_total,
    s.signal_count_24h,
    s.signal_count_7d,
    s.task_synced_count_7d,
    s.latest_tasks_total,
    s.latest_tasks_completed,
    f.rec_shown_7d,
    f.rec_accepted_7d,
    f.rec_dismissed_7d,
    CASE WHEN f.rec_shown_7d > 0 THEN f.rec_accepted_7d / f.rec_shown_7d END AS rec_acceptance_rate_7d,
    s.last_signal_at,
    f.last_feedback_at,
    s.as_of AS updated_at
FROM s JOIN f ON s.user_id = f.user_id AND s.as_of = f.as_of
"""


def _set_points(con: duckdb.DuckDBPyConnection, select_sql: str, params: dict[str, Any] | None = None) -> None:
    con.execute(f"CREATE OR REPLACE TEMP TABLE {POINTS} AS {select_sql}", params or {})


def upsert_features(con: duckdb.DuckDBPyConnection, as_of: datetime, users_table: str | None) -> int:
    """Recompute and replace the rows of the users in `users_table` (all users when None) as of `as_of`.

    `users_table` is a fixed-name temp table with a `user_id` column; returns the table's row count.
    """
    if users_table is None:
        con.execute("DELETE FROM user_features")
        source = "SELECT user_id FROM signal_events UNION SELECT user_id FROM feedback_events"
    else:
        source = f"SELECT DISTINCT user_id FROM {users_table}"
    _set_points(con, f"SELECT user_id, CAST($as_of AS TIMESTAMPTZ) AS as_of FROM ({source})", {"as_of": as_of})
    con.execute(f"INSERT OR REPLACE INTO user_features ({', '.join(FEATURE_COLUMNS)}) {_FEATURE_SQL}")
    return con.execute("SELECT count(*) FROM user_features").fetchone()[0]  # type: ignore[index]


def compute_features(
    con: duckdb.DuckDBPyConnection, as_of: datetime, user_ids: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Recompute rows from the raw tables without writing: the reference for checks and tests."""
    if user_ids is None:
        source = "SELECT user_id FROM signal_events UNION SELECT user_id FROM feedback_events"
        _set_points(con, f"SELECT user_id, CAST($as_of AS TIMESTAMPTZ) AS as_of FROM ({source})", {"as_of": as_of})
    else:
        _set_points(
            con,
            "SELECT DISTINCT unnest($users) AS user_id, CAST($as_of AS TIMESTAMPTZ) AS as_of",
            {"users": user_ids, "as_of": as_of},
        )
    return _rows(con.execute(_FEATURE_SQL))


def _rows(cur: duckdb.DuckDBPyConnection) -> dict[str, dict[str, Any]]:
    names = [d[0] for d in cur.description]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


def inconsistent_users(con: duckdb.DuckDBPyConnection, sample: int) -> tuple[int, list[str]]:
    """Compare up to `sample` stored rows (all when the table is smaller) with a recomputation at
    each row's own updated_at. Returns (rows checked, user ids whose row differs)."""
    rows = con.execute("SELECT count(*) FROM user_features").fetchone()[0]  # type: ignore[index]
    # SAMPLE takes only a literal (int() keeps it one) and reserves memory for all of it: cap it at the table.
    n = max(1, min(int(sample), rows))
    _set_points(con, f"SELECT user_id, updated_at AS as_of FROM user_features USING SAMPLE reservoir({n} ROWS)")
    checked = con.execute(f"SELECT count(*) FROM {POINTS}").fetchone()[0]  # type: ignore[index]
    cols = ", ".join(FEATURE_COLUMNS)
    diff = con.execute(
        f"SELECT user_id FROM ((SELECT {cols} FROM user_features WHERE user_id IN (SELECT user_id FROM {POINTS})) "
        f"EXCEPT ({_FEATURE_SQL})) ORDER BY user_id"
    ).fetchall()
    return checked, [r[0] for r in diff]
