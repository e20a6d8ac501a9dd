"""Staged micro-batches: what the sensor fetched, durable until its run is settled.

A batch is
- `deliveries.parquet`: every message as it was pulled: stream, subject, reply subject, sequence,
  delivery count, stored time, headers worth keeping and the body, unparsed. The run checks and types
  them (`store.intake`); the sensor needs only the reply subjects to ack, NAK or dead-letter them after it;
- a manifest: counts and sequence ranges, for people and run metadata.
It is written on this host first, fsynced, and only then committed, so a batch that is listed is
complete; it is removed only once every message in it is settled. Where committed batches live is
the `Staging`: a folder on one host (`FolderStaging`, the single-box default) or, so that runs and
sensors on other hosts reach them, NATS itself (`shared_staging.NatsStaging`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from feature_pipeline.broker.deliveries import Delivery

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
DELIVERIES_FILE = "deliveries.parquet"
STALE_TEMP_SECONDS = 600
STAGING_MARGIN_BYTES = 16 * 1024 * 1024  # left free on the staging disk, for everything else on it
KEEPALIVE_MARK = "kept-alive"  # its mtime: the batch's last +WPI


@dataclass(frozen=True)
class Manifest:
    batch_id: str
    created_at: str
    counts: dict[str, int]
    seq_ranges: dict[str, list[int]]
    # Staged while its shard was busy (a batch of it waiting to start, or retrying): no run is requested for
    # it; once the shard is free, its parked batches are merged into one and that one gets the run.
    parked: bool = False

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

    Each `add` appends the pull's messages as Parquet row groups under `<root>/.tmp-<batch_id>/`, so
    the sensor holds one fetch in memory however large the batch (and so the run) grows. `close`
    fsyncs and hands the folder to the staging to commit: a listed batch is complete. `abort`
    removes the temp folder; its messages were never acked and come back after ack_wait.
    """

    def __init__(self, staging: Staging, batch_id: str, parked: bool = False) -> None:
        self.staging = staging
        self.batch_id = batch_id
        self.parked = parked
        # When the first message was fetched: ack_wait runs from there (keep-alives are timed from it).
        self.created_at = datetime.now(UTC).isoformat()
        self.tmp = staging.root / f".tmp-{batch_id}"
        self.tmp.mkdir(mode=0o700)
        self.counts: dict[str, int] = {}
        self.ranges: dict[str, list[int]] = {}
        self.bytes = 0
        self._writer = pq.ParquetWriter(self.tmp / DELIVERIES_FILE, DELIVERIES_SCHEMA, compression="zstd")

    @property
    def size(self) -> int:
        return sum(self.counts.values())

    def add(self, deliveries: Sequence[Delivery]) -> None:
        """Append one pull's messages; counts, sequence ranges and bytes follow."""
        if deliveries:
            self._writer.write_table(_deliveries_table(deliveries))
        for d in deliveries:
            self._count(d)

    def _count(self, d: Delivery) -> None:
        self.counts[d.stream] = self.counts.get(d.stream, 0) + 1
        rng = self.ranges.setdefault(d.stream, [d.stream_seq, d.stream_seq])
        rng[0], rng[1] = min(rng[0], d.stream_seq), max(rng[1], d.stream_seq)
        self.bytes += d.size

    def close(self) -> Manifest:
        self._writer.close()
        _fsync_file(self.tmp / DELIVERIES_FILE)
        manifest = Manifest(self.batch_id, self.created_at, self.counts, self.ranges, self.parked)
        self.staging.commit(self.tmp, manifest)
        return manifest

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def new_batch_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:10]


class Staging(ABC):
    """Where staged batches live until they are settled. `root` is this host's folder: the batches
    themselves (`FolderStaging`), or where they are written and read (`NatsStaging`)."""

    root: Path

    @property
    @abstractmethod
    def where(self) -> str:
        """Where the batches are, in words, for messages."""

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

    def payload_room(self) -> tuple[int, int]:
        """(payload bytes a new batch may hold here, free bytes on the disk). Half the free space: a staged
        body is compressed, but a NATS-staged batch is written here and copied again, and the disk keeps a
        margin."""
        self._ensure_root()
        free = shutil.disk_usage(self.root).free
        return max(0, (free - STAGING_MARGIN_BYTES) // 2), free

    def writer(self, batch_id: str | None = None, *, parked: bool = False) -> BatchWriter:
        """A batch staged from several fetches, appended chunk by chunk (see BatchWriter)."""
        self._ensure_root()
        return BatchWriter(self, batch_id or new_batch_id(), parked)

    def merge(self, parked: Sequence[Manifest], max_messages: int, max_bytes: int, chunk: int) -> list[Manifest]:
        """Parked batches (which have no run) as unparked batches of at most `max_messages` messages and about
        `max_bytes` payload bytes, oldest first; then the parked ones are removed. Keep-alives carry on from
        the oldest part's. A crash in between leaves messages in both: each copy's run absorbs what the other
        stored, and acking a message twice is harmless."""
        kept_alive = min(self.kept_alive_at(m) for m in parked)
        out: list[Manifest] = []
        writer: BatchWriter | None = None
        try:
            for manifest in parked:
                for rows in self.iter_deliveries(manifest.batch_id, chunk=chunk):
                    deliveries = [delivery_from_row(r) for r in rows]
                    while deliveries:
                        if writer is None:
                            writer = self.writer()
                        room = max_messages - writer.size
                        writer.add(deliveries[:room])
                        deliveries = deliveries[room:]
                        if writer.size >= max_messages or writer.bytes >= max_bytes:
                            out.append(writer.close())
                            writer = None
            if writer is not None:
                out.append(writer.close())
                writer = None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        for merged in out:
            self.mark_kept_alive(merged.batch_id, kept_alive)
        for manifest in parked:
            self.remove(manifest.batch_id)
        return out

    def stage(self, deliveries: Sequence[Delivery], batch_id: str | None = None) -> Manifest:
        """Write a batch of one pull durably; returns once it is committed."""
        writer = self.writer(batch_id)
        try:
            writer.add(deliveries)
            return writer.close()
        except BaseException:
            writer.abort()
            raise

    def _sweep_temp_folders(self) -> None:
        """Temp folders of a crashed tick are removed once stale: their messages were never acked
        and come back after ack_wait."""
        if not self.root.is_dir():
            return
        now = time.time()
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-") and now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)

    def close(self) -> None:  # noqa: B027 - most stagings hold nothing open
        """Let go of what the staging holds open (a connection, for shared staging)."""

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def commit(self, folder: Path, manifest: Manifest) -> None:
        """Make the written files in `folder` the staged batch `manifest` names (and drop `folder`)."""

    @abstractmethod
    def batches(self) -> list[Manifest]:
        """Committed batches, oldest first."""

    @abstractmethod
    def manifest(self, batch_id: str) -> Manifest | None:
        """A committed batch's manifest; None when there is no such batch (never staged, or settled)."""

    @abstractmethod
    def iter_deliveries(
        self, batch_id: str, columns: Sequence[str] | None = None, chunk: int = 20_000
    ) -> Iterator[list[dict[str, Any]]]:
        """The deliveries in chunks of rows, so settling a large batch never holds all its bodies at once."""

    @abstractmethod
    def kept_alive_at(self, manifest: Manifest) -> float:
        """When the batch's messages were last kept alive (+WPI), else when its first pull was made.
        Kept with the batch, so a restarted (or moved) code server carries on where the last one left off."""

    @abstractmethod
    def mark_kept_alive(self, batch_id: str, at: float) -> None: ...

    @abstractmethod
    def remove(self, batch_id: str) -> None:
        """Forget a settled batch (removing one that is gone already is harmless)."""

    @abstractmethod
    def local_copy(self, batch_id: str) -> contextlib.AbstractContextManager[Path]:
        """The batch's files in a folder on this host, for the run that stores them."""


class FolderStaging(Staging):
    """Batches as folders `<root>/<batch_id>/` on one host: the sensor and the runs share its disk."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def where(self) -> str:
        return f"staging folder {self.root}"

    def path(self, batch_id: str) -> Path:
        return self.root / batch_id

    def commit(self, folder: Path, manifest: Manifest) -> None:
        """Write the manifest and rename the folder into place: a batch folder that exists is complete."""
        (folder / "manifest.json").write_text(json.dumps(manifest.__dict__, indent=1))
        _fsync_dir(folder)
        os.rename(folder, self.path(manifest.batch_id))
        _fsync_dir(self.root)

    def batches(self) -> list[Manifest]:
        self._sweep_temp_folders()
        if not self.root.is_dir():
            return []
        found = [self.manifest(e.name) for e in self.root.iterdir() if e.is_dir() and not e.name.startswith(".")]
        return sorted((m for m in found if m is not None), key=lambda m: (m.created_at, m.batch_id))

    def manifest(self, batch_id: str) -> Manifest | None:
        path = self.path(batch_id) / "manifest.json"
        if not path.is_file():
            return None
        return Manifest(**json.loads(path.read_text()))

    def deliveries(self, batch_id: str, columns: Sequence[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(batch_id) / DELIVERIES_FILE, columns=list(columns) if columns else None)

    def iter_deliveries(
        self, batch_id: str, columns: Sequence[str] | None = None, chunk: int = 20_000
    ) -> Iterator[list[dict[str, Any]]]:
        yield from iter_parquet(self.path(batch_id) / DELIVERIES_FILE, columns, chunk)

    def kept_alive_at(self, manifest: Manifest) -> float:
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

    @contextlib.contextmanager
    def local_copy(self, batch_id: str) -> Iterator[Path]:
        yield self.path(batch_id)


def delivery_from_row(row: dict[str, Any]) -> Delivery:
    """A staged deliveries row as the `Delivery` it was fetched as."""
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


def iter_parquet(path: Path, columns: Sequence[str] | None, chunk: int) -> Iterator[list[dict[str, Any]]]:
    pf = pq.ParquetFile(path)
    for rb in pf.iter_batches(batch_size=chunk, columns=list(columns) if columns else None):
        yield rb.to_pylist()
