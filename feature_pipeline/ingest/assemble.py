"""One pull, sorted: valid events (typed columns for the raw tables), dead-letter copies, and poison.

Poison is set aside with its reason (the sensor dead-letters it at once); everything else is
staged. Events are kept column-wise so staging builds Arrow arrays directly, not a dict per row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from feature_pipeline import streams
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.contract import Contract, contract_for
from feature_pipeline.envelopes import PoisonMessage

_EVENTS_SCHEMA_FIELDS: list[tuple[str, pa.DataType]] = [
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
EVENTS_SCHEMA = pa.schema(_EVENTS_SCHEMA_FIELDS)
_DEAD_LETTERS_SCHEMA_FIELDS: list[tuple[str, pa.DataType]] = [
    ("original_stream", pa.string()),
    ("original_subject", pa.string()),
    ("original_seq", pa.int64()),
    ("delivery_count", pa.int32()),
    ("reason", pa.string()),
    ("dead_lettered_at", pa.timestamp("us", tz="UTC")),
    ("deadletter_seq", pa.int64()),
    ("body", pa.binary()),
]
DEAD_LETTERS_SCHEMA = pa.schema(_DEAD_LETTERS_SCHEMA_FIELDS)
EVENT_COLUMNS = tuple(EVENTS_SCHEMA.names)


def _empty_columns() -> dict[str, list[Any]]:
    return {name: [] for name in EVENT_COLUMNS}


@dataclass
class Assembled:
    """What to stage (events column-wise, `received_at` in epoch microseconds; dead-letter rows;
    every staged delivery) and what is poison."""

    event_columns: dict[str, list[Any]] = field(default_factory=_empty_columns)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    staged: list[Delivery] = field(default_factory=list)
    poison: list[tuple[Delivery, str]] = field(default_factory=list)

    def events_table(self) -> pa.Table:
        return pa.Table.from_arrays(
            [pa.array(self.event_columns[f.name], type=f.type) for f in EVENTS_SCHEMA], schema=EVENTS_SCHEMA
        )

    @property
    def events(self) -> list[dict[str, Any]]:
        """Row view of the events (tests, diagnostics); the sensor never builds it."""
        rows: list[dict[str, Any]] = self.events_table().to_pylist()
        return rows


def _stored_at(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


def dead_letter_row(d: Delivery) -> dict[str, Any]:
    """A DEADLETTER message as a dead_letters row, from the headers the pipeline set on its copy."""
    h = d.headers or {}

    def as_int(name: str) -> int | None:
        try:
            return int(h[name])
        except (KeyError, ValueError):
            return None

    try:
        at = datetime.fromisoformat(h[streams.H_AT].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        at = _stored_at(d.stored_ns)
    original_seq = as_int(streams.H_SEQUENCE)
    known = streams.H_STREAM in h and original_seq is not None
    return {
        # A message someone else put on deadletter.> is recorded under its own DEADLETTER sequence.
        "original_stream": h.get(streams.H_STREAM) if known else streams.DEADLETTER.name,
        "original_subject": h.get(streams.H_SUBJECT, d.subject.removeprefix(f"{streams.DEADLETTER.prefixes[0]}.")),
        "original_seq": original_seq if known else d.stream_seq,
        "delivery_count": as_int(streams.H_DELIVERIES) or 0,
        "reason": h.get(streams.H_REASON, "no reason given (message published to deadletter.> by another client)"),
        "dead_lettered_at": at,
        "deadletter_seq": d.stream_seq,
        "body": d.data,
    }


def assemble(deliveries: Iterable[Delivery], contract: Contract | None = None) -> Assembled:
    """Validate fetched messages against the sources' `contract` (the packaged sources' when None: tests);
    poison ones are set aside with their reason.

    The sensor's hot path (every message passes here once): the columns are bound to locals and
    appended to directly, with no row dict and no lookup per field.
    """
    validate = (contract or contract_for(streams.PACKAGED)).validate
    out = Assembled()
    c = out.event_columns
    c_stream, c_subject, c_seq, c_delivered, c_received = (
        c["stream"], c["subject"], c["stream_seq"], c["num_delivered"], c["received_at"]
    )  # fmt: skip
    c_id, c_type, c_user, c_at, c_version, c_data, c_known = (
        c["event_id"], c["type"], c["user_id"], c["occurred_at"], c["schema_version"], c["data"], c["known_type"]
    )  # fmt: skip
    staged, dead_name = out.staged, streams.DEADLETTER.name
    for d in deliveries:
        if d.stream == dead_name:
            out.dead_letters.append(dead_letter_row(d))
            staged.append(d)
            continue
        try:
            ev = validate(d.stream, d.subject, d.data)
        except PoisonMessage as exc:
            out.poison.append((d, str(exc)))
            continue
        except Exception as exc:  # a validator bug must not wedge the consumer; the copy in DEADLETTER keeps it
            out.poison.append((d, f"unexpected validation error {exc!r}"))
            continue
        c_stream.append(d.stream)
        c_subject.append(d.subject)
        c_seq.append(d.stream_seq)
        c_delivered.append(d.num_delivered)
        c_received.append(d.stored_ns // 1000)
        c_id.append(ev.event_id)
        c_type.append(ev.type)
        c_user.append(ev.user_id)
        c_at.append(ev.occurred_at)
        c_version.append(ev.schema_version)
        c_data.append(ev.data_json)
        c_known.append(ev.known_type)
        staged.append(d)
    return out
