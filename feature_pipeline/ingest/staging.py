"""Staged micro-batches: what the sensor fetched, durable on disk until its run is settled.

A batch is a folder `<staging>/<batch_id>/` with
- `events.parquet`: valid events, typed, ready for the raw tables;
- `dead_letters.parquet`: messages read from the DEADLETTER stream, for the dead_letters table;
- `deliveries.parquet`: every staged message's reply subject, delivery count and original
  bytes, which is all the sensor needs to ack, NAK or dead-letter it after the run;
- `manifest.json`: counts and sequence ranges, for people and run metadata.
It is written under a temporary name, fsynced and renamed, so a batch folder that
exists is complete. The folder is removed only once every message in it is settled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.ingest.assemble import DEAD_LETTERS_SCHEMA, EVENTS_SCHEMA, Assembled

_DELIVERIES_SCHEMA_FIELDS: list[tuple[str, pa.DataType]] = [
    ("stream", pa.string()),
    ("subject", pa.string()),
    ("reply", pa.string()),
    ("stream_seq", pa.int64()),
    ("num_delivered", pa.int32()),
    ("stored_ns", pa.int64()),
    ("headers", pa.string()),
    ("body", pa.binary()),
]
DELIVERIES_SCHEMA = pa.schema(_DELIVERIES_SCHEMA_FIELDS)
STALE_TEMP_SECONDS = 600
KEEPALIVE_MARK = "kept-alive"  # its mtime: the batch's last +WPI


@dataclass(frozen=True)
class Manifest:
    batch_id: str
    created_at: str
    counts: dict[str, int]
    seq_ranges: dict[str, list[int]]

    @property
    def size(self) -> int:
        return sum(self.counts.values())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _headers_json(headers: dict[str, str] | None) -> str | None:
    """Headers worth keeping for a later dead-letter copy: `Nats-*` ones are dropped there anyway."""
    if not headers or (len(headers) == 1 and "Nats-Msg-Id" in headers):  # the usual case, cheaply
        return None
    kept = {k: v for k, v in headers.items() if not k.startswith("Nats-")}
    return json.dumps(kept) if kept else None


def _deliveries_table(staged: Sequence[Delivery]) -> pa.Table:
    columns: list[list[Any]] = [[], [], [], [], [], [], [], []]
    c_stream, c_subject, c_reply, c_seq, c_delivered, c_stored, c_headers, c_body = columns
    for d in staged:
        c_stream.append(d.stream)
        c_subject.append(d.subject)
        c_reply.append(d.reply)
        c_seq.append(d.stream_seq)
        c_delivered.append(d.num_delivered)
        c_stored.append(d.stored_ns)
        c_headers.append(_headers_json(d.headers))
        c_body.append(d.data)
    return pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, DELIVERIES_SCHEMA, strict=True)],
        schema=DELIVERIES_SCHEMA,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BatchWriter:
    """One batch being staged, possibly from several fetches.

    Each `add` appends the fetch's rows as Parquet row groups under `.tmp-<batch_id>/`, so the
    sensor holds one fetch in memory however large the batch (and so the run) grows. `close`
    fsyncs, writes the manifest and renames: a batch folder that exists is complete. `abort`
    removes the temp folder; its messages were never acked and come back after ack_wait.
    """

    def __init__(self, staging: Staging, batch_id: str) -> None:
        self.staging = staging
        self.batch_id = batch_id
        # When the first message was fetched: ack_wait runs from there (keep-alives are timed from it).
        self.created_at = datetime.now(UTC).isoformat()
        self.tmp = staging.root / f".tmp-{batch_id}"
        self.tmp.mkdir(mode=0o700)
        self.counts: dict[str, int] = {}
        self.ranges: dict[str, list[int]] = {}
        self.bytes = 0
        self._writers = {
            name: pq.ParquetWriter(self.tmp / f"{name}.parquet", schema, compression="zstd")
            for name, schema in (
                ("events", EVENTS_SCHEMA),
                ("dead_letters", DEAD_LETTERS_SCHEMA),
                ("deliveries", DELIVERIES_SCHEMA),
            )
        }

    @property
    def size(self) -> int:
        return sum(self.counts.values())

    def add(self, assembled: Assembled) -> None:
        """Append one pull's rows; counts, sequence ranges and bytes follow."""
        if assembled.event_columns["event_id"]:
            self._writers["events"].write_table(assembled.events_table())
        if assembled.dead_letters:
            self._writers["dead_letters"].write_table(
                pa.Table.from_pylist(assembled.dead_letters, schema=DEAD_LETTERS_SCHEMA)
            )
        if assembled.staged:
            self._writers["deliveries"].write_table(_deliveries_table(assembled.staged))
        for d in assembled.staged:
            self._count(d)

    def _count(self, d: Delivery) -> None:
        self.counts[d.stream] = self.counts.get(d.stream, 0) + 1
        rng = self.ranges.setdefault(d.stream, [d.stream_seq, d.stream_seq])
        rng[0], rng[1] = min(rng[0], d.stream_seq), max(rng[1], d.stream_seq)
        self.bytes += d.size

    def close(self) -> Manifest:
        for name, writer in self._writers.items():
            writer.close()
            _fsync_file(self.tmp / f"{name}.parquet")
        manifest = Manifest(self.batch_id, self.created_at, self.counts, self.ranges)
        (self.tmp / "manifest.json").write_text(json.dumps(manifest.__dict__, indent=1))
        _fsync_dir(self.tmp)
        os.rename(self.tmp, self.staging.path(self.batch_id))
        _fsync_dir(self.staging.root)
        return manifest

    def abort(self) -> None:
        for writer in self._writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def new_batch_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:10]


class Staging:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def check_writable(self) -> None:
        """Raise OSError unless a batch could be written now: fetching what cannot be staged
        would only burn the messages' deliveries towards NATS_MAX_DELIVER."""
        self._ensure_root()
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        with open(probe, "wb") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()

    def path(self, batch_id: str) -> Path:
        return self.root / batch_id

    def writer(self, batch_id: str | None = None) -> BatchWriter:
        """A batch staged from several fetches, appended chunk by chunk (see BatchWriter)."""
        self._ensure_root()
        return BatchWriter(self, batch_id or new_batch_id())

    def stage(self, assembled: Assembled, batch_id: str | None = None) -> Manifest:
        """Write a batch of one fetch durably; returns once it is complete on disk."""
        writer = self.writer(batch_id)
        try:
            writer.add(assembled)
            return writer.close()
        except BaseException:
            writer.abort()
            raise

    def batches(self) -> list[Manifest]:
        """Complete batches, oldest first. Temp folders of a crashed tick are removed once stale:
        their messages were never acked and come back after ack_wait."""
        if not self.root.is_dir():
            return []
        found = []
        now = time.time()
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                if now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            manifest = self.manifest(entry.name) if entry.is_dir() else None
            if manifest is not None:
                found.append(manifest)
        return sorted(found, key=lambda m: (m.created_at, m.batch_id))

    def manifest(self, batch_id: str) -> Manifest | None:
        """A complete staged batch's manifest; None when there is no such batch (never staged, or settled)."""
        path = self.path(batch_id) / "manifest.json"
        if not path.is_file():
            return None
        return Manifest(**json.loads(path.read_text()))

    def deliveries(self, batch_id: str, columns: Sequence[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(batch_id) / "deliveries.parquet", columns=list(columns) if columns else None)

    def iter_deliveries(
        self, batch_id: str, columns: Sequence[str] | None = None, chunk: int = 20_000
    ) -> Iterator[list[dict[str, Any]]]:
        """The deliveries in chunks of rows, so settling a large batch never holds all its bodies at once."""
        pf = pq.ParquetFile(self.path(batch_id) / "deliveries.parquet")
        for rb in pf.iter_batches(batch_size=chunk, columns=list(columns) if columns else None):
            yield rb.to_pylist()

    def kept_alive_at(self, manifest: Manifest) -> float:
        """When the batch's messages were last kept alive (+WPI), else when its first pull was made.

        Kept on disk beside the batch, so a restarted code server carries on where the last one left off."""
        try:
            return (self.path(manifest.batch_id) / KEEPALIVE_MARK).stat().st_mtime
        except FileNotFoundError:
            return datetime.fromisoformat(manifest.created_at).timestamp()

    def mark_kept_alive(self, batch_id: str, at: float) -> None:
        mark = self.path(batch_id) / KEEPALIVE_MARK
        mark.touch(mode=0o600)
        os.utime(mark, (at, at))

    def remove(self, batch_id: str) -> None:
        shutil.rmtree(self.path(batch_id), ignore_errors=True)


def delivery_from_row(row: dict[str, Any]) -> Delivery:
    return Delivery(
        stream=row["stream"],
        subject=row["subject"],
        reply=row["reply"],
        data=row["body"],
        headers=json.loads(row["headers"]) if row["headers"] else None,
        stream_seq=row["stream_seq"],
        num_delivered=row["num_delivered"],
        stored_ns=row["stored_ns"],
    )
