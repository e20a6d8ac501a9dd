"""The DuckDB feature store: the idempotent apply of a staged batch, the window clock, snapshots, reads.

Every write happens in one transaction (`db.transaction` owns BEGIN and COMMIT): a batch lands in
the raw tables, the dead letters and user_features together or not at all. After the commit the
health figures are read; `ingest.online` then writes the changed rows to the online store.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from feature_pipeline import shards as feature_shards
from feature_pipeline import streams
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.contract import contract_for
from feature_pipeline.settings import Settings
from feature_pipeline.store import archive, batch, incremental, intake, known_sources, layout, online
from feature_pipeline.store.archive import history_view
from feature_pipeline.store.db import one, open_file, scalar, transaction
from feature_pipeline.store.features import inconsistent_users, write_snapshot
from feature_pipeline.store.first_day import note_batch_first_day, record_first_day
from feature_pipeline.store.loader import load_registry
from feature_pipeline.store.registry import Registry
from feature_pipeline.store.schema import SNAPSHOTS_FIXED, USER_FEATURES_FIXED, ddl, index_existing_events, sync_columns

AfterCommit = Callable[[duckdb.DuckDBPyConnection], None]
DeadLetter = Callable[[list[tuple[Delivery, str]]], object]  # copies poison to DEADLETTER; raises if it cannot
RECENT_MINUTES = 10  # the commit_latency check grades the batches stored this recently


@dataclass(frozen=True)
class StoreHealth:
    """Figures read right after a commit, for asset metadata and the checks."""

    dead_letters_last_hour: int
    dead_letter_reasons: list[tuple[str, int]]  # the ten most common reasons, with counts
    latest_dead_letters: list[tuple[str, str, int, str]]  # (when, stream, sequence, reason), newest first
    consistency_checked: int
    inconsistent_users: list[str]
    consistency_checked_at: datetime | None = None  # when that comparison was made (None: not yet)
    recent_batches: int = 0  # batches stored in the last RECENT_MINUTES
    recent_worst_p95_seconds: float | None = None  # the highest p95 publish→commit among them

    @classmethod
    def combine(cls, parts: list[StoreHealth]) -> StoreHealth:
        """Several shards' figures as one store's: counts add up, the worst latency and the oldest comparison
        stand for all, the differing users of every shard are listed."""
        reasons: dict[str, int] = {}
        for part in parts:
            for reason, n in part.dead_letter_reasons:
                reasons[reason] = reasons.get(reason, 0) + n
        worst = [p.recent_worst_p95_seconds for p in parts if p.recent_worst_p95_seconds is not None]
        checked = [p.consistency_checked_at for p in parts]
        return cls(
            dead_letters_last_hour=sum(p.dead_letters_last_hour for p in parts),
            dead_letter_reasons=sorted(reasons.items(), key=lambda r: (-r[1], r[0]))[:10],
            latest_dead_letters=sorted((d for p in parts for d in p.latest_dead_letters), reverse=True)[:5],
            consistency_checked=sum(p.consistency_checked for p in parts),
            inconsistent_users=sorted(u for p in parts for u in p.inconsistent_users),
            consistency_checked_at=None if None in checked else min(c for c in checked if c is not None),
            recent_batches=sum(p.recent_batches for p in parts),
            recent_worst_p95_seconds=max(worst) if worst else None,
        )


@dataclass(frozen=True)
class Refresh:
    """What a run did to user_features."""

    valid_as_of: datetime  # every row is correct as of this instant (the run's clock)
    rows_written: int  # rows recomputed: the batch's users and those whose windows moved
    rebuilt: bool  # every row was recomputed (new store, or the feature definitions changed)
    schema_changes: list[str] = field(default_factory=list)
    partials_rebuilt: list[str] = field(default_factory=list)  # sources whose all-time partials were rebuilt
    sources_changed: list[str] = field(default_factory=list)  # sources added to or removed from the registry

    @classmethod
    def combine(cls, parts: list[Refresh]) -> Refresh:
        """Several shards' refreshes as one store's: rows add up, the earliest clock stands for all."""
        return cls(
            valid_as_of=min(p.valid_as_of for p in parts),
            rows_written=sum(p.rows_written for p in parts),
            rebuilt=all(p.rebuilt for p in parts),
            schema_changes=parts[0].schema_changes,
            partials_rebuilt=sorted({s for p in parts for s in p.partials_rebuilt}),
            sources_changed=parts[0].sources_changed,
        )


@dataclass(frozen=True)
class BatchResult:
    batch_id: str
    committed_at: datetime
    written: batch.Written
    rows: dict[str, int]  # rows per table after the commit (raw tables and user_features)
    event_ids: list[str]
    # JetStream stored time -> DuckDB commit, over the events of this batch (None for an empty batch)
    latency_p50_seconds: float | None
    latency_p95_seconds: float | None
    latency_max_seconds: float | None
    lateness: batch.Lateness
    refresh: Refresh
    health: StoreHealth
    intake: intake.Intake = field(default_factory=intake.Intake)
    seconds: dict[str, float] = field(default_factory=dict)  # where the apply's time went, phase by phase

    @property
    def poison(self) -> list[tuple[Delivery, str]]:
        """The batch's poison messages with their reasons (dead-lettered by the run, before its commit)."""
        return self.intake.poison

    @property
    def events_in_batch(self) -> int:
        return self.written.events_in_batch

    @property
    def inserted(self) -> int:
        return sum(self.written.inserted.values())

    def new_in(self, stream: str) -> int:
        """New raw rows from one stream (by its JetStream name)."""
        return self.written.inserted.get(stream, 0)

    def new_summary(self) -> str:
        """`2 new from SIGNALS, 1 new from FEEDBACK`, for the run log."""
        return ", ".join(f"{n} new from {stream}" for stream, n in self.written.inserted.items()) or "nothing new"

    @property
    def duplicates_absorbed(self) -> int:
        return self.events_in_batch - self.inserted

    @property
    def dead_letters_inserted(self) -> int:
        return self.written.dead_letters

    @property
    def conflicting_duplicates(self) -> int:
        """Same id, different content: kept the first, recorded the others in dead_letters."""
        return self.written.conflicts

    @property
    def users_touched(self) -> int:
        return self.written.users_touched

    @property
    def user_features_rows(self) -> int:
        return self.rows["user_features"]

    @property
    def late_events(self) -> int:
        return self.lateness.late_events

    @property
    def late_days(self) -> list[str]:
        return self.lateness.late_days

    @property
    def max_lateness_seconds(self) -> float | None:
        return self.lateness.max_lateness_seconds


class Laps:
    """Seconds per phase, each call closing the phase since the last (the run log says where a batch's time went)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._since = time.monotonic()

    def __call__(self, phase: str) -> dict[str, float]:
        now = time.monotonic()
        self.seconds[phase] = round(now - self._since, 2)
        self._since = now
        return self.seconds


class FeatureStore:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        registry: Registry | None = None,
        allowed_lateness: timedelta = timedelta(hours=1),
        shard: int = 0,
        shards: int = 1,
        base: str | os.PathLike[str] | None = None,
    ) -> None:
        """`shard` of `shards`: which users the file holds (see `feature_pipeline.shards`); `base` is
        FEATURE_STORE_PATH, beside which the shards' files are."""
        self.path = Path(path)
        self.registry = registry or load_registry()
        self.allowed_lateness = allowed_lateness
        self.shard, self.shards = shard, shards
        self.base = Path(base or path)

    @classmethod
    def from_settings(cls, settings: Settings, shard: int = 0) -> FeatureStore:
        """The store every entry point uses: a shard's file, the feature registry and lateness."""
        return cls(
            feature_shards.for_shard(settings, shard).feature_store_path,
            registry=load_registry(settings.features_file or None),
            allowed_lateness=timedelta(seconds=settings.allowed_lateness_seconds),
            shard=shard,
            shards=settings.shards,
            base=settings.feature_store_path,
        )

    @property
    def name(self) -> str:
        """`the store at <file>` and its shard, for messages."""
        of = feature_shards.describe(self.shard, self.shards)
        return f"the store at {self.path}" + (f" ({of})" if of else "")

    def connect(self, *, read_only: bool = False, wait_seconds: float = 120.0) -> duckdb.DuckDBPyConnection:
        """Open the file, waiting while another process holds its lock; a writer gets any missing tables, and
        is refused a file of another layout of shards (or a new file beside another layout's)."""
        if not read_only and not self.path.exists():
            refused = feature_shards.new_file_problem(self.base, self.shards)
            if refused:
                raise feature_shards.LayoutError(refused)
        con = open_file(self.path, read_only=read_only, wait_seconds=wait_seconds)
        if not read_only:
            try:
                for statement in ddl(self.registry):
                    con.execute(statement)
                layout.keep(con, self.shard, self.shards, self.path)
                index_existing_events(con, self.registry)
                record_first_day(con, self.path)
            except BaseException:
                con.close()
                raise
        return con

    @contextlib.contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self.connect()
        try:
            yield con
        finally:
            con.close()

    # -- writes -----------------------------------------------------------------------------------

    def apply_batch(
        self,
        batch_dir: Path,
        batch_id: str,
        *,
        consistency_sample: int = 1000,
        consistency_every: float = 0.0,
        now: datetime | None = None,
        before_commit: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
        after_commit: AfterCommit | None = None,
        dead_letter: DeadLetter | None = None,
        pipeline: str | None = None,
    ) -> BatchResult:
        """Store one staged batch and refresh its users' features, all in one transaction.

        The batch's messages are checked against the contract first (`store.intake`); its poison goes to
        `dead_letter` (the run's copy to DEADLETTER: the sensor acks the whole batch after the run) before
        anything is written, so a copy that cannot be made fails the run and keeps the batch staged. Without
        `dead_letter` poison is only reported (replay, tests). `pipeline` is the durable prefix of the pipeline
        whose consumer fetched the batch: dead-letter copies another pipeline made are left to it (None, for
        a replay of the DEADLETTER stream: every copy is recorded).

        Idempotent: see `store.batch`; an id event_index already holds is absorbed before anything
        merges into the all-time partials, so no event is counted twice. `before_commit` runs inside the
        transaction, after every write (fault drills); `after_commit` right after COMMIT, on the same
        connection (the online store's write). The comparison with the whole-history reference is made when
        the last one is `consistency_every` seconds old.
        """
        now = now or datetime.now(UTC)
        files, sources = batch.StagedFiles(batch_dir), self.registry.event_streams
        laps = Laps()
        with self._connection() as con:
            laps("open")
            with transaction(con):
                taken = intake.load(con, files.deliveries, contract_for(sources), sources, pipeline)
                if self.shards > 1:
                    intake.keep_shard(con, files.deliveries, self.shard, self.shards, taken)
                laps("intake")
                if taken.poison and dead_letter is not None:
                    dead_letter(taken.poison)
                    laps("dead_letter")
                written = batch.write(con, files, batch_id, now, sources)
                note_batch_first_day(con, self.path, batch.EVENTS)
                laps("write")
                refresh = self._refresh(con, now, batch.TOUCHED)
                late = batch.lateness(con, now, self.allowed_lateness)
                laps("refresh")
                if before_commit is not None:
                    before_commit(con)
            laps("commit")
            if after_commit is not None:
                after_commit(con)
                laps("online")
            p50, p95, worst = batch.latency(con, datetime.now(UTC))
            con.execute(
                "UPDATE ingested_batches SET latency_p95_seconds = $p WHERE batch_id = $b", {"p": p95, "b": batch_id}
            )
            return BatchResult(
                batch_id=batch_id,
                committed_at=now,
                written=written,
                rows={
                    t: self._count(con, t) for t in (*(s.table for s in self.registry.event_streams), "user_features")
                },
                event_ids=batch.event_ids(con),
                latency_p50_seconds=p50,
                latency_p95_seconds=p95,
                latency_max_seconds=worst,
                lateness=late,
                refresh=refresh,
                health=self._health(con, consistency_sample, consistency_every),
                intake=taken,
                seconds=laps("health"),
            )

    def recompute_all(
        self, consistency_sample: int = 1000, after_commit: AfterCommit | None = None
    ) -> tuple[Refresh, StoreHealth]:
        """Rebuild every user_features row from the raw tables, as of now."""
        return self._refresh_only(None, consistency_sample, rebuild=True, after_commit=after_commit)

    def advance(
        self, now: datetime | None = None, consistency_sample: int = 1000, after_commit: AfterCommit | None = None
    ) -> tuple[Refresh, StoreHealth]:
        """Move the clock to now without new events: the rows whose windows moved are recomputed."""
        return self._refresh_only(now, consistency_sample, rebuild=False, after_commit=after_commit)

    def snapshot(self, day: date) -> int:
        """Replace the snapshot partition of `day` (idempotent: a re-run gives the same rows)."""
        with self._connection() as con, transaction(con):
            sync_columns(con, self.registry, "user_feature_snapshots", SNAPSHOTS_FIXED)
            return write_snapshot(con, self.registry, day)

    def forget_missing_ids(self) -> int:
        """Drop event_index entries whose rows are in no raw table nor the archive (deleted by hand, or lost);
        returns how many. A full scan: for repairs, not for batches."""
        history = " UNION ALL ".join(
            f"SELECT event_id FROM {history_view(s.table)}" for s in self.registry.event_streams
        )
        with self._connection() as con, transaction(con):
            return int(scalar(con, f"DELETE FROM event_index WHERE event_id NOT IN ({history})"))

    def archive(
        self,
        root: str | os.PathLike[str],
        horizon: timedelta,
        *,
        now: datetime | None = None,
        dry_run: bool = False,
        after_file: Callable[[Path], None] | None = None,
    ) -> archive.ArchiveResult:
        """Move raw events that occurred more than `horizon` ago to Parquet under `root` (see `store.archive`)."""
        with self._connection() as con:
            row = con.execute("SELECT valid_as_of FROM feature_state WHERE id = 1").fetchone()
            windows = [w for s in self.registry.event_streams for w in self.registry.windows(s.key)]
            cutoff = archive.cutoff_for(
                now or datetime.now(UTC), horizon, row[0] if row else None, max(windows, default=timedelta(0))
            )
            return archive.archive(
                con, Path(root), cutoff, self.registry.event_streams, dry_run=dry_run, after_file=after_file
            )

    def _refresh_only(
        self, now: datetime | None, consistency_sample: int, *, rebuild: bool, after_commit: AfterCommit | None
    ) -> tuple[Refresh, StoreHealth]:
        with self._connection() as con:
            with transaction(con):
                con.execute(f"CREATE OR REPLACE TEMP TABLE {batch.TOUCHED} (user_id VARCHAR)")
                for spec in self.registry.event_streams:  # no batch: nothing new to merge
                    con.execute(
                        f"CREATE OR REPLACE TEMP TABLE {batch.new_table(spec.key)} AS FROM {spec.table} LIMIT 0"
                    )
                refresh = self._refresh(con, now or datetime.now(UTC), batch.TOUCHED, rebuild=rebuild)
            if after_commit is not None:
                after_commit(con)
            return refresh, self._health(con, consistency_sample)

    def _refresh(
        self, con: duckdb.DuckDBPyConnection, now: datetime, touched: str, *, rebuild: bool = False
    ) -> Refresh:
        """Bring user_features to the clock `now` inside the caller's transaction.

        The all-time partials take in what became visible since the last run (rebuilt from the history
        when a source's all-time definitions changed); then the `touched` users and those whose windows
        moved are rewritten. Every row is rewritten when the store is new or the definitions changed
        (columns are added/dropped first). `rebuild` recomputes everything from the history.
        """
        state = con.execute("SELECT valid_as_of, fingerprint FROM feature_state WHERE id = 1").fetchone()
        changes = sync_columns(con, self.registry, "user_features", USER_FEATURES_FIXED)
        changes += sync_columns(con, self.registry, "user_feature_snapshots", SNAPSHOTS_FIXED)
        previous, fingerprint = state if state else (None, None)
        as_of = max(now, previous) if previous else now  # a clock that stepped back must not undo windows
        rebuilt_partials = []
        for spec in self.registry.event_streams:
            if rebuild or previous is None or not incremental.partials_current(con, self.registry, spec.key):
                incremental.rebuild_partials(con, self.registry, spec.key, history_view(spec.table), as_of)
                rebuilt_partials.append(spec.key)
            else:
                new_rows = batch.new_table(spec.key)
                incremental.merge_partials(con, self.registry, spec.key, spec.table, new_rows, previous, as_of)
        rebuild = rebuild or previous is None or fingerprint != self.registry.fingerprint or bool(changes)
        if rebuild:
            online.mark_all_deleted(con)  # a user who has no row after the rebuild is deleted from the KV
            con.execute("DELETE FROM user_features")
            users = incremental.every_user(self.registry)
        else:
            moved = incremental.users_changed_by_time(con, self.registry, previous, as_of)
            users = f"SELECT user_id FROM {touched} UNION SELECT user_id FROM {moved}"
        rows = incremental.write_rows(con, self.registry, as_of, users)
        online.mark_rows(con, self.registry, incremental.FEATURE_ROWS, as_of)
        con.execute(
            "INSERT OR REPLACE INTO feature_state VALUES (1, $as_of, $fp)",
            {"as_of": as_of, "fp": self.registry.fingerprint},
        )
        sources = known_sources.changes(con, self.registry, now)
        return Refresh(as_of, rows, rebuild, changes, rebuilt_partials, sources)

    def export(self, path: str | os.PathLike[str], *, wait_seconds: float = 120.0) -> tuple[int, datetime | None]:
        """Write user_features to a Parquet file for bulk readers, atomically (a temp file renamed over the
        old one); returns (rows, valid_as_of). O(users): on demand or on a schedule, never per batch."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        con = self.connect(read_only=True, wait_seconds=wait_seconds)
        try:
            row = con.execute("SELECT valid_as_of FROM feature_state WHERE id = 1").fetchone()
            as_of = row[0] if row else None
            target.parent.mkdir(parents=True, exist_ok=True)
            quoted = str(tmp).replace("'", "''")
            con.execute(
                f"COPY (SELECT *, CAST($as_of AS TIMESTAMPTZ) AS valid_as_of FROM user_features ORDER BY user_id) "
                f"TO '{quoted}' (FORMAT parquet, COMPRESSION zstd)",
                {"as_of": as_of},
            )
            os.replace(tmp, target)
            return self._count(con, "user_features"), as_of
        finally:
            con.close()
            with contextlib.suppress(OSError):
                tmp.unlink()

    # -- reads ------------------------------------------------------------------------------------

    def _health(self, con: duckdb.DuckDBPyConnection, consistency_sample: int, every: float = 0.0) -> StoreHealth:
        table = streams.DEADLETTER.table
        hour = int(scalar(con, f"SELECT count(*) FROM {table} WHERE dead_lettered_at > now() - INTERVAL 1 HOUR"))
        reasons = con.execute(
            f"SELECT reason, count(*) AS n FROM {table} GROUP BY reason ORDER BY n DESC, reason LIMIT 10"
        ).fetchall()
        latest = con.execute(
            "SELECT strftime(dead_lettered_at, '%Y-%m-%dT%H:%M:%SZ'), original_stream, original_seq, reason "
            f"FROM {table} ORDER BY dead_lettered_at DESC, original_seq DESC LIMIT 5"
        ).fetchall()
        checked, bad, at = self._consistency(con, consistency_sample, every)
        recent, worst = one(
            con,
            "SELECT count(*), max(latency_p95_seconds) FROM ingested_batches "
            f"WHERE committed_at > now() - INTERVAL {RECENT_MINUTES} MINUTE",
        )
        return StoreHealth(
            hour,
            [(r[0], r[1]) for r in reasons],
            [(r[0], r[1], r[2], r[3]) for r in latest],
            checked,
            bad,
            at,
            int(recent),
            worst,
        )

    def _consistency(
        self, con: duckdb.DuckDBPyConnection, sample: int, every: float
    ) -> tuple[int, list[str], datetime]:
        """Sampled rows against the whole-history reference, or the last such comparison while it is
        younger than `every` seconds and the definitions have not changed since."""
        last = con.execute(
            "SELECT checked_at, rows_checked, inconsistent FROM consistency_state "
            "WHERE id = 1 AND fingerprint = $fp AND checked_at > now() - to_seconds($every)",
            {"fp": self.registry.fingerprint, "every": every},
        ).fetchone()
        if last is not None and every > 0:
            return int(last[1]), list(last[2]), last[0]
        checked, bad = inconsistent_users(con, sample, self.registry)
        at = datetime.now(UTC)
        con.execute(
            "INSERT OR REPLACE INTO consistency_state VALUES (1, $at, $n, $bad, $fp)",
            {"at": at, "n": checked, "bad": bad, "fp": self.registry.fingerprint},
        )
        return checked, bad, at

    @staticmethod
    def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
        return int(scalar(con, f"SELECT count(*) FROM {table}"))

    def batch_state(self, batch_id: str, consistency_sample: int = 1000) -> tuple[datetime | None, StoreHealth]:
        """When a batch was stored (None: never), and the store's checks: for a run with nothing to store."""
        with self._connection() as con:
            found = con.execute("SELECT committed_at FROM ingested_batches WHERE batch_id = $b", {"b": batch_id})
            row = found.fetchone()
            return (None if row is None else row[0]), self._health(con, consistency_sample)

    def user_features(self, user_id: str, *, wait_seconds: float = 30.0) -> dict[str, Any] | None:
        con = self.connect(read_only=True, wait_seconds=wait_seconds)
        try:
            cur = con.execute("SELECT * FROM user_features WHERE user_id = $u", {"u": user_id})
            row = cur.fetchone()
            return None if row is None else dict(zip([d[0] for d in cur.description], row, strict=True))
        finally:
            con.close()
