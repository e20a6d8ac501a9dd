"""Changing the number of shards: the stores of N shards rebuilt as N' stores, with ingestion paused.

A user's shard is crc32(user_id) mod N, so a new N moves most users. Their history moves with them: every
raw event (archived ones too, which come back into the live tables), the snapshots and the dead letters
(by the user of their body, as the sensor routes them) are read from the old files, read-only, and written
to the new ones by the new map; then each new store recomputes every feature row from its history, as a
rebuild by hand does, and the online store receives them on each shard's first sync. The new files are
built in a folder of their own and moved beside FEATURE_STORE_PATH only when all are complete; the old
ones are left where they are, to check against and then delete.

Nothing may be in flight: the old stagings must be empty (stop `up`, or switch off the ingest sensor, and
let the last batches settle); `feature-pipeline reshard` checks that, and records the new layout beside the
online store last, which is what lets the sensor ingest again with FEATURE_PIPELINE_SHARDS=N'.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from feature_pipeline import shards, streams
from feature_pipeline.settings import Settings
from feature_pipeline.store.archive import history_view
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.first_day import first_day_file
from feature_pipeline.store.schema import index_existing_events

BATCH_ROWS = 100_000


class ReshardError(RuntimeError):
    """The stores cannot be resharded as asked; the text says why and what to do."""


@dataclass
class ReshardReport:
    moved: dict[str, int] = field(default_factory=dict)  # rows per table
    users: list[int] = field(default_factory=list)  # user_features rows per new shard
    files: list[Path] = field(default_factory=list)

    def summary(self, old: int, new: int) -> str:
        rows = ", ".join(f"{n} {table}" for table, n in self.moved.items())
        per = ", ".join(f"shard {k}: {n}" for k, n in enumerate(self.users))
        return f"resharded {old} -> {new}: moved {rows}; users per shard: {per}"


def reshard(settings: Settings, to: int, log: Callable[[str], None] = print) -> ReshardReport:
    """Build the stores of `to` shards from those of settings.shards (see the module docstring)."""
    old = [FeatureStore.from_settings(settings, k) for k in range(settings.shards)]
    _check(settings, to, old)
    target = dataclasses.replace(settings, shards=to)
    work = Path(settings.feature_store_path).parent / f".reshard-{settings.shards}-to-{to}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = work / Path(settings.feature_store_path).name
    new = [
        FeatureStore(shards.part_name(base, k, to), registry=old[0].registry, shard=k, shards=to, base=base)
        for k in range(to)
    ]
    report = ReshardReport()
    cons = [s.connect() for s in new]
    try:
        for store in old:
            log(f"reading {store.name}")
            _move(store, cons, to, report)
        for con in cons:
            index_existing_events(con, old[0].registry)
    finally:
        for con in cons:
            con.close()
    for store in new:
        refresh, _ = store.recompute_all(consistency_sample=1)
        report.users.append(refresh.rows_written)
    report.files = _put_in_place(new, Path(target.feature_store_path), to)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _check(settings: Settings, to: int, old: list[FeatureStore]) -> None:
    if to == settings.shards:
        raise ReshardError(f"the store is split into {to} shard(s) already")
    if not 1 <= to <= 64:
        raise ReshardError(f"--to must be between 1 and 64, got {to}")
    missing = [str(s.path) for s in old if not s.path.exists()]
    if missing:
        raise ReshardError(
            f"the {settings.shards}-shard store is not all on this host ({', '.join(missing)} missing): copy every "
            "shard's file here (each with its .first-day file), reshard, then copy the new files to their hosts"
        )
    made = [str(p) for p in shards.layouts_beside(settings.feature_store_path).get(to, [])]
    if made:
        raise ReshardError(f"files of a {to}-shard store are here already ({', '.join(made)}): move them away first")


def _move(store: FeatureStore, cons: list[duckdb.DuckDBPyConnection], to: int, report: ReshardReport) -> None:
    """One old store's rows into the new stores, by the new map."""
    src = store.connect(read_only=True, wait_seconds=10)
    try:
        for spec in store.registry.event_streams:
            _copy(src, f"SELECT * FROM {history_view(spec.table)}", spec.table, cons, to, _by_user, report)
        _copy(src, "SELECT * FROM user_feature_snapshots", "user_feature_snapshots", cons, to, _by_user, report)
        dead = streams.DEADLETTER.table
        _copy(src, f"SELECT * FROM {dead}", dead, cons, to, _by_body, report)
        redriven = (
            f"SELECT r.*, d.body FROM redrives r JOIN {dead} d "
            "ON d.original_stream = r.original_stream AND d.original_seq = r.original_seq"
        )
        _copy(src, redriven, "redrives", cons, to, _by_body, report, drop="body")
        batches = src.sql("SELECT * FROM ingested_batches").to_arrow_table()
        _insert(cons[0], "ingested_batches", batches)  # bookkeeping: kept once, with shard 0
    finally:
        src.close()


def _by_user(table: pa.Table, to: int) -> list[int]:
    return [shards.shard_of(str(u), to) for u in table.column("user_id").to_pylist()]


def _by_body(table: pa.Table, to: int) -> list[int]:
    return [shards.shard_of_body(b or b"", to) for b in table.column("body").to_pylist()]


def _copy(
    src: duckdb.DuckDBPyConnection,
    sql: str,
    name: str,
    cons: list[duckdb.DuckDBPyConnection],
    to: int,
    route: Callable[[pa.Table, int], list[int]],
    report: ReshardReport,
    drop: str | None = None,
) -> None:
    reader = src.sql(sql).fetch_record_batch(BATCH_ROWS)
    for batch in reader:
        table = pa.Table.from_batches([batch])
        index = pa.array(route(table, to), pa.int32())
        rows = table.drop_columns([drop]) if drop else table
        for k, con in enumerate(cons):
            _insert(con, name, rows.filter(pc.equal(index, pa.scalar(k, pa.int32()))))
        report.moved[name] = report.moved.get(name, 0) + table.num_rows


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    if rows.num_rows == 0:
        return
    with con.cursor() as cur:  # a cursor of its own: the connection may hold a result not read to its end
        cur.register("reshard_rows", rows)
        cur.execute(f"INSERT INTO {table} BY NAME SELECT * FROM reshard_rows")


def _put_in_place(new: list[FeatureStore], base: Path, to: int) -> list[Path]:
    """Move the finished files (and their first-day records) beside FEATURE_STORE_PATH."""
    placed = []
    for store in new:
        final = shards.part_name(base, store.shard, to)
        for made, dest in ((store.path, final), (first_day_file(store.path), first_day_file(final))):
            if made.exists():
                os.replace(made, dest)
        placed.append(final)
    return placed
