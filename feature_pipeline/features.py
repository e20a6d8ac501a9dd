"""The feature SQL: `user_features` as of a point in time, from the raw event tables.

One query serves the incremental path (users touched by a batch), the full
recomputation and the consistency check, so they cannot drift apart. Every
feature of a row is computed as of its `updated_at` from the events with
`occurred_at <= updated_at`; windows are `(updated_at - window, updated_at]`.
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

# {users} is either empty or a fixed `AND user_id IN (SELECT user_id FROM <temp table>)`;
# the point in time is always the bound parameter $as_of.
_FEATURE_SQL = """
WITH s AS (
    SELECT
        user_id,
        count(*) AS signal_count_total,
        count(*) FILTER (WHERE occurred_at > $as_of - INTERVAL 24 HOUR) AS signal_count_24h,
        count(*) FILTER (WHERE occurred_at > $as_of - INTERVAL 7 DAY) AS signal_count_7d,
        count(*) FILTER (WHERE type = 'task.synced' AND occurred_at > $as_of - INTERVAL 7 DAY)
            AS task_synced_count_7d,
        arg_max(CAST(data->>'tasks_total' AS BIGINT), (occurred_at, event_id))
            FILTER (WHERE type = 'task.synced') AS latest_tasks_total,
        arg_max(CAST(data->>'tasks_completed' AS BIGINT), (occurred_at, event_id))
            FILTER (WHERE type = 'task.synced') AS latest_tasks_completed,
        max(occurred_at) AS last_signal_at
    FROM signal_events
    WHERE occurred_at <= $as_of {users}
    GROUP BY user_id
),
f AS (
    SELECT
        user_id,
        count(*) FILTER (WHERE type = 'recommendation.shown' AND occurred_at > $as_of - INTERVAL 7 DAY)
            AS rec_shown_7d,
        count(*) FILTER (WHERE type = 'recommendation.accepted' AND occurred_at > $as_of - INTERVAL 7 DAY)
            AS rec_accepted_7d,
        count(*) FILTER (WHERE type = 'recommendation.dismissed' AND occurred_at > $as_of - INTERVAL 7 DAY)
            AS rec_dismissed_7d,
        max(occurred_at) AS last_feedback_at
    FROM feedback_events
    WHERE occurred_at <= $as_of {users}
    GROUP BY user_id
)
SELECT
    coalesce(s.user_id, f.user_id) AS user_id,
    coalesce(s.signal_count_total, 0) AS signal_count_total,
    coalesce(s.signal_count_24h, 0) AS signal_count_24h,
    coalesce(s.signal_count_7d, 0) AS signal_count_7d,
    coalesce(s.task_synced_count_7d, 0) AS task_synced_count_7d,
    s.latest_tasks_total,
    s.latest_tasks_completed,
    coalesce(f.rec_shown_7d, 0) AS rec_shown_7d,
    coalesce(f.rec_accepted_7d, 0) AS rec_accepted_7d,
    coalesce(f.rec_dismissed_7d, 0) AS rec_dismissed_7d,
    CASE WHEN coalesce(f.rec_shown_7d, 0) > 0 THEN f.rec_accepted_7d / f.rec_shown_7d END
        AS rec_acceptance_rate_7d,
    s.last_signal_at,
    f.last_feedback_at,
    CAST($as_of AS TIMESTAMPTZ) AS updated_at
FROM s FULL OUTER JOIN f ON s.user_id = f.user_id
"""


def feature_query(users_table: str | None = None) -> str:
    """The feature SELECT, for all users or for those listed in a (fixed-name) temp table."""
    users = f"AND user_id IN (SELECT user_id FROM {users_table})" if users_table else ""
    return _FEATURE_SQL.format(users=users)


def upsert_features(con: duckdb.DuckDBPyConnection, as_of: datetime, users_table: str | None) -> int:
    """Recompute and replace the rows of the given users (all when None) as of `as_of`."""
    if users_table is None:
        con.execute("DELETE FROM user_features")
    con.execute(
        f"INSERT OR REPLACE INTO user_features ({', '.join(FEATURE_COLUMNS)}) " + feature_query(users_table),
        {"as_of": as_of},
    )
    return con.execute("SELECT count(*) FROM user_features").fetchone()[0]  # type: ignore[index]


def compute_features(
    con: duckdb.DuckDBPyConnection, as_of: datetime, user_ids: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Recompute rows from the raw tables without writing: the reference for checks and tests."""
    sql = feature_query()
    params: dict[str, Any] = {"as_of": as_of}
    if user_ids is not None:
        sql = f"SELECT * FROM ({sql}) WHERE user_id IN (SELECT unnest($users))"
        params["users"] = user_ids
    cur = con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}
