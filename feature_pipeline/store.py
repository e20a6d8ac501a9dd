"""The DuckDB feature store: schema, the idempotent apply of a staged batch, reads.

DuckDB allows one read-write process per file. Ingest runs are serialised by the
Dagster pool `duckdb` (dagster.yaml); a reader that holds the file briefly (the CLI)
is waited for rather than failing the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from feature_pipeline.features import (
    STATE_DDL,
    default_registry,
    inconsistent_users,
    snapshots_ddl,
    sync_columns,
    upsert_features,
    user_features_ddl,
    users_changed_by_time,
    write_snapshot,
)
from feature_pipeline.registry import Registry

SLOW_COMMIT_SECONDS = 10
RAW_TABLES = {"SIGNALS": "signal_events", "FEEDBACK": "feedback_events"}

_RAW_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    event_id VARCHAR PRIMARY KEY,
    subject VARCHAR NOT NULL,
    stream_seq BIGINT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    ingested_at TIMESTAMPTZ NOT NULL,
    user_id VARCHAR NOT NULL,
    type VARCHAR NOT NULL,
    schema_version INTEGER NOT NULL,
    data JSON NOT NULL,
    known_type BOOLEAN NOT NULL,
    batch_id VARCHAR NOT NULL
)
"""

SCHEMA = [
    *(_RAW_DDL.format(table=t) for t in RAW_TABLES.values()),
    STATE_DDL,
    """
    CREATE TABLE IF NOT EXISTS dead_letters (
        original_stream VARCHAR NOT NULL,
        original_subject VARCHAR NOT NULL,
        original_seq BIGINT NOT NULL,
        delivery_count INTEGER NOT NULL,
        reason VARCHAR NOT NULL,
        dead_lettered_at TIMESTAMPTZ NOT NULL,
        deadletter_seq BIGINT NOT NULL,
        body BLOB,
        recorded_at TIMESTAMPTZ NOT NULL,
        batch_id VARCHAR NOT NULL,
        PRIMARY KEY (original_stream, original_seq)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS ingested_batches (
        batch_id VARCHAR PRIMARY KEY,
        committed_at TIMESTAMPTZ NOT NULL,
        events_in_batch BIGINT NOT NULL,
        events_inserted BIGINT NOT NULL,
        dead_letters_inserted BIGINT NOT NULL,
        users_touched BIGINT NOT NULL
    )
    """,
]


class StoreBusy(RuntimeError):
    """Another process held the DuckDB file for longer than we were willing to wait."""


class InjectedFault(RuntimeError):
    """Raised by FEATURE_PIPELINE_FAULTS=fail-run, for tests and drills."""


@dataclass(frozen=True)
class StoreHealth:
    """Figures read right after a commit, for asset metadata and the checks."""

    dead_letters_last_hour: int
    dead_letter_reasons: list[tuple[str, int]]  # the ten most common reasons, with counts
    latest_dead_letters: list[tuple[str, str, int, str]]  # (when, stream, sequence, reason), newest first
    consistency_checked: int
    inconsistent_users: list[str]


@dataclass(frozen=True)
class Refresh:
    """What a run did to user_features."""

    valid_as_of: datetime  # every row is correct as of this instant (the run's clock)
    rows_written: int  # rows recomputed: the batch's users and those whose windows moved
    rebuilt: bool  # every row was recomputed (new store, or the feature definitions changed)
    schema_changes: list[str] = field(default_factory=list)
    serving_error: str | None = None  # the serving copy could not be replaced (the old one stays)


@dataclass(frozen=True)
class BatchResult:
    batch_id: str
    committed_at: datetime
    events_in_batch: int
    signals_inserted: int
    feedback_inserted: int
    duplicates_absorbed: int
    dead_letters_inserted: int
    conflicting_duplicates: int  # same id, different content: kept the first, recorded the others in dead_letters
    users_touched: int
    user_features_rows: int
    signal_events_rows: int
    feedback_events_rows: int
    event_ids: list[str]
    # JetStream stored time -> DuckDB commit, over the events of this batch (None for an empty batch)
    latency_p50_seconds: float | None
    latency_p95_seconds: float | None
    latency_max_seconds: float | None
    # events that reached the store more than the allowed lateness after they occurred (stored all the same)
    late_events: int
    late_days: list[str]  # their UTC days: snapshots of these days taken earlier miss them
    max_lateness_seconds: float | None
    refresh: Refresh
    health: StoreHealth


class FeatureStore:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        registry: Registry | None = None,
        serving_path: str | os.PathLike[str] | None = None,
        allowed_lateness: timedelta = timedelta(hours=1),
    ) -> None:
        self.path = Path(path)
        self.registry = registry or default_registry()
        self.serving_path = Path(serving_path) if serving_path else None
        self.allowed_lateness = allowed_lateness

    def connect(self, *, read_only: bool = False, wait_seconds: float = 120.0) -> duckdb.DuckDBPyConnection:
        """Open the file, waiting while another process holds its lock."""
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        elif not self.path.exists():
            raise FileNotFoundError(f"no feature store at {self.path} yet (no batch has been ingested)")
        deadline = time.monotonic() + wait_seconds
        pause = 0.05
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise StoreBusy(f"could not open {self.path} within {wait_seconds:.0f} s: {exc}") from None
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
        if not read_only:
            os.chmod(self.path, 0o600)
            for ddl in (*SCHEMA, user_features_ddl(self.registry), snapshots_ddl(self.registry)):
                con.execute(ddl)
        return con

    def apply_batch(
        self,
        batch_dir: Path,
        batch_id: str,
        *,
        faults: frozenset[str] = frozenset(),
        consistency_sample: int = 1000,
        now: datetime | None = None,
    ) -> BatchResult:
        """Store one staged batch and refresh its users' features, all in one transaction.

        Idempotent: events are keyed by id (a redelivered or duplicated event is absorbed),
        dead letters by original stream and sequence, and feature rows are recomputed
        from the raw tables rather than incremented.
        """
        now = now or datetime.now(UTC)
        with self._transaction() as con:
            con.execute(
                "CREATE OR REPLACE TEMP TABLE batch_events AS SELECT * FROM read_parquet($p) "
                "QUALIFY row_number() OVER (PARTITION BY stream, event_id ORDER BY stream_seq) = 1",
                {"p": str(batch_dir / "events.parquet")},
            )
            inserted = {}
            for stream, table in RAW_TABLES.items():
                row = con.execute(
                    f"INSERT INTO {table} SELECT event_id, subject, stream_seq, occurred_at, received_at, $now, "
                    "user_id, type, schema_version, data, known_type, $batch FROM batch_events "
                    "WHERE stream = $stream ON CONFLICT DO NOTHING",
                    {"now": now, "batch": batch_id, "stream": stream},
                ).fetchone()
                inserted[stream] = row[0] if row else 0
            row = con.execute(
                "INSERT INTO dead_letters SELECT original_stream, original_subject, original_seq, delivery_count, "
                "reason, dead_lettered_at, deadletter_seq, body, $now, $batch FROM read_parquet($p) "
                "QUALIFY row_number() OVER (PARTITION BY original_stream, original_seq ORDER BY deadletter_seq) = 1 "
                "ON CONFLICT DO NOTHING",
                {"now": now, "batch": batch_id, "p": str(batch_dir / "dead_letters.parquet")},
            ).fetchone()
            dead_inserted = row[0] if row else 0
            conflicts = self._record_conflicting_duplicates(con, batch_dir, batch_id, now)
            con.execute("CREATE OR REPLACE TEMP TABLE touched_users AS SELECT DISTINCT user_id FROM batch_events")
            touched = con.execute("SELECT count(*) FROM touched_users").fetchone()[0]  # type: ignore[index]
            in_batch = con.execute("SELECT count(*) FROM read_parquet($p)", {"p": str(batch_dir / "events.parquet")})
            events_in_batch = in_batch.fetchone()[0]  # type: ignore[index]
            refresh = self._refresh(con, now, "touched_users")
            late, late_days, max_late = con.execute(
                "SELECT count(*) FILTER (WHERE x > $allowed), "
                "list(DISTINCT strftime(occurred_at, '%Y-%m-%d') ORDER BY strftime(occurred_at, '%Y-%m-%d')) "
                "FILTER (WHERE x > $allowed), max(x) "
                "FROM (SELECT occurred_at, epoch(CAST($now AS TIMESTAMPTZ)) - epoch(occurred_at) AS x "
                "FROM batch_events)",
                {"now": now, "allowed": self.allowed_lateness.total_seconds()},
            ).fetchone()  # type: ignore[misc]
            ids = [r[0] for r in con.execute("SELECT event_id FROM batch_events ORDER BY stream_seq").fetchall()]
            con.execute(
                "INSERT INTO ingested_batches VALUES ($batch, $now, $n, $ins, $dl, $users) ON CONFLICT DO NOTHING",
                {
                    "batch": batch_id,
                    "now": now,
                    "n": events_in_batch,
                    "ins": sum(inserted.values()),
                    "dl": dead_inserted,
                    "users": touched,
                },
            )
            if "slow-commit" in faults:
                time.sleep(SLOW_COMMIT_SECONDS)
            if "fail-run" in faults:
                raise InjectedFault("FEATURE_PIPELINE_FAULTS=fail-run: failing before COMMIT (nothing is stored)")
            con.execute("COMMIT")
            refresh = self._publish(con, refresh)
            committed = datetime.now(UTC)
            p50, p95, worst = con.execute(
                "SELECT quantile_cont(x, 0.5), quantile_cont(x, 0.95), max(x) FROM "
                "(SELECT epoch(CAST($c AS TIMESTAMPTZ)) - epoch(received_at) AS x FROM batch_events)",
                {"c": committed},
            ).fetchone()  # type: ignore[misc]
            return BatchResult(
                batch_id=batch_id,
                committed_at=now,
                events_in_batch=events_in_batch,
                signals_inserted=inserted["SIGNALS"],
                feedback_inserted=inserted["FEEDBACK"],
                duplicates_absorbed=events_in_batch - sum(inserted.values()),
                dead_letters_inserted=dead_inserted,
                conflicting_duplicates=conflicts,
                users_touched=touched,
                user_features_rows=self._count(con, "user_features"),
                signal_events_rows=self._count(con, "signal_events"),
                feedback_events_rows=self._count(con, "feedback_events"),
                event_ids=ids,
                latency_p50_seconds=p50,
                latency_p95_seconds=p95,
                latency_max_seconds=worst,
                late_events=late,
                late_days=(late_days or [])[:31],
                max_lateness_seconds=max_late,
                refresh=refresh,
                health=self._health(con, consistency_sample),
            )

    def recompute_all(self, consistency_sample: int = 1000) -> tuple[Refresh, StoreHealth]:
        """Rebuild every user_features row from the raw tables, as of now."""
        return self._refresh_only(None, consistency_sample, rebuild=True)

    def advance(self, now: datetime | None = None, consistency_sample: int = 1000) -> tuple[Refresh, StoreHealth]:
        """Move the clock to now without new events: the rows whose windows moved are recomputed."""
        return self._refresh_only(now, consistency_sample, rebuild=False)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write connection inside BEGIN; rolled back on any error, closed always. The caller COMMITs."""
        con = self.connect()
        try:
            con.execute("BEGIN")
            yield con
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def _refresh_only(
        self, now: datetime | None, consistency_sample: int, *, rebuild: bool
    ) -> tuple[Refresh, StoreHealth]:
        with self._transaction() as con:
            con.execute("CREATE OR REPLACE TEMP TABLE touched_users (user_id VARCHAR)")
            refresh = self._refresh(con, now or datetime.now(UTC), "touched_users", rebuild=rebuild)
            con.execute("COMMIT")
            return self._publish(con, refresh), self._health(con, consistency_sample)

    def _refresh(
        self, con: duckdb.DuckDBPyConnection, now: datetime, touched: str, *, rebuild: bool = False
    ) -> Refresh:
        """Bring user_features to the clock `now` inside the caller's transaction.

        Recomputes the `touched` users and those whose windows moved since the last run; everything
        when the store is new or the feature definitions changed (columns are added/dropped first).
        """
        state = con.execute("SELECT valid_as_of, fingerprint FROM feature_state WHERE id = 1").fetchone()
        fixed = {"user_id", "updated_at"}
        changes = sync_columns(con, self.registry, "user_features", fixed)
        changes += sync_columns(con, self.registry, "user_feature_snapshots", {"snapshot_date", "user_id", "as_of"})
        previous = state[0] if state else None
        as_of = max(now, previous) if previous else now  # a clock that stepped back must not undo windows
        rebuild = rebuild or previous is None or state[1] != self.registry.fingerprint or bool(changes)
        if rebuild:
            rows = upsert_features(con, self.registry, as_of, None)
        else:
            users_changed_by_time(con, self.registry, previous, as_of, "time_users")
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE refresh_users AS SELECT user_id FROM {touched} "
                "UNION SELECT user_id FROM time_users"
            )
            rows = upsert_features(con, self.registry, as_of, "refresh_users")
        con.execute(
            "INSERT OR REPLACE INTO feature_state VALUES (1, $as_of, $fp)",
            {"as_of": as_of, "fp": self.registry.fingerprint},
        )
        return Refresh(as_of, rows, rebuild, changes)

    def _publish(self, con: duckdb.DuckDBPyConnection, refresh: Refresh) -> Refresh:
        """Replace the serving copy atomically (write a temp file, rename over the old one).

        A failure leaves the previous copy in place and is reported, not raised: the batch is
        committed, and failing its run would only redeliver what is already stored.
        """
        if self.serving_path is None:
            return refresh
        tmp = self.serving_path.with_name(f".{self.serving_path.name}.{os.getpid()}.tmp")
        try:
            self.serving_path.parent.mkdir(parents=True, exist_ok=True)
            stamp = refresh.valid_as_of.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
            target = str(tmp).replace("'", "''")
            con.execute(
                f"COPY (SELECT *, TIMESTAMPTZ '{stamp}' AS valid_as_of FROM user_features ORDER BY user_id) "
                f"TO '{target}' (FORMAT parquet, COMPRESSION zstd)"
            )
            os.replace(tmp, self.serving_path)
            return refresh
        except (OSError, duckdb.Error) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return dataclasses.replace(
                refresh, serving_error=f"could not replace the serving copy {self.serving_path}: {exc}"
            )

    def snapshot(self, day: date) -> int:
        """Replace the snapshot partition of `day` (idempotent: a re-run gives the same rows)."""
        with self._transaction() as con:
            sync_columns(con, self.registry, "user_feature_snapshots", {"snapshot_date", "user_id", "as_of"})
            rows = write_snapshot(con, self.registry, day)
            con.execute("COMMIT")
            return rows

    @staticmethod
    def _record_conflicting_duplicates(
        con: duckdb.DuckDBPyConnection, batch_dir: Path, batch_id: str, now: datetime
    ) -> int:
        """An id seen again with other content is not absorbed silently: the first stored version stays,
        each other version goes to dead_letters with its body and both sequences in the reason
        (deadletter_seq 0: recorded by the run, not republished on DEADLETTER)."""
        total = 0
        for stream, table in RAW_TABLES.items():
            row = con.execute(
                f"""
                INSERT INTO dead_letters
                SELECT b.stream, b.subject, b.stream_seq, b.num_delivered,
                       'duplicate id ' || b.event_id || ' with different content; kept the first stored version ('
                       || $stream || ' #' || e.stream_seq || ')',
                       $now, 0, d.body, $now, $batch
                FROM read_parquet($events) b
                JOIN {table} e ON e.event_id = b.event_id
                LEFT JOIN read_parquet($deliveries) d ON d.stream = b.stream AND d.stream_seq = b.stream_seq
                WHERE b.stream = $stream AND e.stream_seq <> b.stream_seq
                  AND (e.user_id, e.type, e.occurred_at, CAST(e.data AS VARCHAR))
                      IS DISTINCT FROM (b.user_id, b.type, b.occurred_at, b.data)
                ON CONFLICT DO NOTHING
                """,
                {
                    "stream": stream,
                    "now": now,
                    "batch": batch_id,
                    "events": str(batch_dir / "events.parquet"),
                    "deliveries": str(batch_dir / "deliveries.parquet"),
                },
            ).fetchone()
            total += row[0] if row else 0
        return total

    def _health(self, con: duckdb.DuckDBPyConnection, consistency_sample: int) -> StoreHealth:
        hour = con.execute(
            "SELECT count(*) FROM dead_letters WHERE dead_lettered_at > now() - INTERVAL 1 HOUR"
        ).fetchone()[0]  # type: ignore[index]
        reasons = con.execute(
            "SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason ORDER BY n DESC, reason LIMIT 10"
        ).fetchall()
        latest = con.execute(
            "SELECT strftime(dead_lettered_at, '%Y-%m-%dT%H:%M:%SZ'), original_stream, original_seq, reason "
            "FROM dead_letters ORDER BY dead_lettered_at DESC, original_seq DESC LIMIT 5"
        ).fetchall()
        checked, bad = inconsistent_users(con, consistency_sample, self.registry)
        return StoreHealth(hour, [tuple(r) for r in reasons], [tuple(r) for r in latest], checked, bad)  # type: ignore[misc]

    @staticmethod
    def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]

    def user_features(self, user_id: str, *, wait_seconds: float = 30.0) -> dict[str, Any] | None:
        con = self.connect(read_only=True, wait_seconds=wait_seconds)
        try:
            cur = con.execute("SELECT * FROM user_features WHERE user_id = $u", {"u": user_id})
            row = cur.fetchone()
            return None if row is None else dict(zip([d[0] for d in cur.description], row, strict=True))
        finally:
            con.close()
