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

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from feature_pipeline import broker
from feature_pipeline.broker import Delivery
from feature_pipeline.envelopes import PoisonMessage, validate

EVENTS_SCHEMA = pa.schema(
    [
        ("stream", pa.string()),
        ("subject", pa.string()),
        ("stream_seq", pa.int64()),
        ("num_delivered", pa.int32()),
        ("received_at", pa.timestamp("us", tz="UTC")),
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("user_id", pa.string()),
        ("occurred_at", pa.timestamp("us", tz="UTC")),
        ("schema_version", pa.int32()),
        ("data", pa.string()),
        ("known_type", pa.bool_()),
    ]
)
DEAD_LETTERS_SCHEMA = pa.schema(
    [
        ("original_stream", pa.string()),
        ("original_subject", pa.string()),
        ("original_seq", pa.int64()),
        ("delivery_count", pa.int32()),
        ("reason", pa.string()),
        ("dead_lettered_at", pa.timestamp("us", tz="UTC")),
        ("deadletter_seq", pa.int64()),
        ("body", pa.binary()),
    ]
)
DELIVERIES_SCHEMA = pa.schema(
    [
        ("stream", pa.string()),
        ("subject", pa.string()),
        ("reply", pa.string()),
        ("stream_seq", pa.int64()),
        ("num_delivered", pa.int32()),
        ("stored_ns", pa.int64()),
        ("headers", pa.string()),
        ("body", pa.binary()),
    ]
)
STALE_TEMP_SECONDS = 600


@dataclass
class Assembled:
    """One fetch, sorted: what to stage and what is poison (dead-lettered at once)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    staged: list[Delivery] = field(default_factory=list)
    poison: list[tuple[Delivery, str]] = field(default_factory=list)


def _micros(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


def _dead_letter_row(d: Delivery) -> dict[str, Any]:
    h = d.headers or {}

    def as_int(name: str) -> int | None:
        try:
            return int(h[name])
        except (KeyError, ValueError):
            return None

    try:
        at = datetime.fromisoformat(h[broker.H_AT].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        at = _micros(d.stored_ns)
    original_seq = as_int(broker.H_SEQUENCE)
    known = broker.H_STREAM in h and original_seq is not None
    return {
        # A message someone else put on deadletter.> is recorded under its own DEADLETTER sequence.
        "original_stream": h.get(broker.H_STREAM) if known else broker.DEADLETTER.name,
        "original_subject": h.get(broker.H_SUBJECT, d.subject.removeprefix("deadletter.")),
        "original_seq": original_seq if known else d.stream_seq,
        "delivery_count": as_int(broker.H_DELIVERIES) or 0,
        "reason": h.get(broker.H_REASON, "no reason given (message published to deadletter.> by another client)"),
        "dead_lettered_at": at,
        "deadletter_seq": d.stream_seq,
        "body": d.data,
    }


def assemble(deliveries: Iterable[Delivery]) -> Assembled:
    """Validate fetched messages; poison ones are set aside with their reason."""
    out = Assembled()
    for d in deliveries:
        if d.stream == broker.DEADLETTER.name:
            out.dead_letters.append(_dead_letter_row(d))
            out.staged.append(d)
            continue
        try:
            ev = validate(d.subject, d.data)
        except PoisonMessage as exc:
            out.poison.append((d, str(exc)))
            continue
        except Exception as exc:  # a validator bug must not wedge the consumer; the copy in DEADLETTER keeps it
            out.poison.append((d, f"unexpected validation error {exc!r}"))
            continue
        out.events.append(
            {
                "stream": d.stream,
                "subject": d.subject,
                "stream_seq": d.stream_seq,
                "num_delivered": d.num_delivered,
                "received_at": _micros(d.stored_ns),
                "event_id": ev.event_id,
                "type": ev.type,
                "user_id": ev.user_id,
                "occurred_at": ev.occurred_at,
                "schema_version": ev.schema_version,
                "data": ev.data_json,
                "known_type": ev.known_type,
            }
        )
        out.staged.append(d)
    return out


@dataclass(frozen=True)
class Manifest:
    batch_id: str
    created_at: str
    counts: dict[str, int]
    seq_ranges: dict[str, list[int]]

    @property
    def size(self) -> int:
        return sum(self.counts.values())


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd")
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def stage(self, assembled: Assembled, batch_id: str | None = None) -> Manifest:
        """Write a batch durably; returns once it is complete on disk."""
        self._ensure_root()
        batch_id = batch_id or new_batch_id()
        tmp = self.root / f".tmp-{batch_id}"
        tmp.mkdir(mode=0o700)
        _write_parquet(pa.Table.from_pylist(assembled.events, schema=EVENTS_SCHEMA), tmp / "events.parquet")
        _write_parquet(
            pa.Table.from_pylist(assembled.dead_letters, schema=DEAD_LETTERS_SCHEMA),
            tmp / "dead_letters.parquet",
        )
        rows = [
            {
                "stream": d.stream,
                "subject": d.subject,
                "reply": d.reply,
                "stream_seq": d.stream_seq,
                "num_delivered": d.num_delivered,
                "stored_ns": d.stored_ns,
                "headers": json.dumps(d.headers) if d.headers else None,
                "body": d.data,
            }
            for d in assembled.staged
        ]
        _write_parquet(pa.Table.from_pylist(rows, schema=DELIVERIES_SCHEMA), tmp / "deliveries.parquet")
        counts: dict[str, int] = {}
        ranges: dict[str, list[int]] = {}
        for d in assembled.staged:
            counts[d.stream] = counts.get(d.stream, 0) + 1
            lo, hi = ranges.get(d.stream, [d.stream_seq, d.stream_seq])
            ranges[d.stream] = [min(lo, d.stream_seq), max(hi, d.stream_seq)]
        manifest = Manifest(batch_id, datetime.now(UTC).isoformat(), counts, ranges)
        (tmp / "manifest.json").write_text(json.dumps(manifest.__dict__, indent=1))
        _fsync_dir(tmp)
        os.rename(tmp, self.path(batch_id))
        _fsync_dir(self.root)
        return manifest

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
            manifest = entry / "manifest.json"
            if entry.is_dir() and manifest.is_file():
                found.append(Manifest(**json.loads(manifest.read_text())))
        return sorted(found, key=lambda m: (m.created_at, m.batch_id))

    def deliveries(self, batch_id: str, columns: Sequence[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(batch_id) / "deliveries.parquet", columns=list(columns) if columns else None)

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
