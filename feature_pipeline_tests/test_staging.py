"""Staged batches on disk, and the broker helpers they rely on (ack-subject parsing, redaction, times).

A staged batch is the only record of which messages still need an ack, NAK or dead letter
after the run; losing or mis-reading it means messages are settled wrongly.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from feature_pipeline import streams
from feature_pipeline.broker.auth import redact
from feature_pipeline.broker.deliveries import Delivery, parse_reply, ts_from_nats
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.ingest.staging import STALE_TEMP_SECONDS, FolderStaging, delivery_from_row

NOW = datetime(2026, 11, 27, 5, 0, tzinfo=UTC)
STORED_AT = datetime(2026, 11, 27, 5, 0, 0, 123456, tzinfo=UTC)
STORED_NS = (STORED_AT - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000

SYNCED = {"provider": "todoist", "tasks_total": 12, "tasks_completed": 3}
REC = {"recommendation_id": "r-1", "item_id": "i-1"}


def delivery(
    stream: str,
    subject: str,
    seq: int,
    data: bytes,
    *,
    num_delivered: int = 1,
    headers: dict[str, str] | None = None,
) -> Delivery:
    """A Delivery as `Broker.pull` builds it from a 9-token ack subject."""
    reply = f"$JS.ACK.{stream}.c.{num_delivered}.{seq}.{seq}.{STORED_NS}.0"
    return Delivery(stream, subject, reply, data, headers, seq, num_delivered, STORED_NS)


def signal(seq: int, event_id: str, *, num_delivered: int = 1) -> Delivery:
    body = make_envelope(event_id, "task.synced", "u-1", NOW, SYNCED)
    return delivery("SIGNALS", "signals.task.synced", seq, body, num_delivered=num_delivered)


def feedback(seq: int, event_id: str) -> Delivery:
    body = make_envelope(event_id, "recommendation.shown", "u-2", NOW, REC)
    return delivery("FEEDBACK", "feedback.recommendation.shown", seq, body)


def dead_letter(seq: int, original_seq: int, **extra: str) -> Delivery:
    """A copy made by `Broker.dead_letter`, with the headers it sets."""
    headers = {
        streams.H_STREAM: "SIGNALS",
        streams.H_SUBJECT: "signals.task.synced",
        streams.H_SEQUENCE: str(original_seq),
        streams.H_DELIVERIES: "5",
        streams.H_REASON: "gave up after 5 deliveries",
        streams.H_AT: "2026-11-27T06:00:00.5Z",
        streams.H_STORED: str(STORED_NS),
        **extra,
    }
    return delivery("DEADLETTER", "deadletter.signals.task.synced", seq, b"original body", headers=headers)


# -- staging on disk ------------------------------------------------------------------------


def test_stage_batches_and_deliveries(tmp_path: Path) -> None:
    """The manifest lists counts and seq ranges per stream; deliveries keep every reply subject and count."""
    staging = FolderStaging(tmp_path / "staging")
    staged = [
        signal(10, "evt-1", num_delivered=3),
        signal(12, "evt-2"),
        signal(11, "evt-3"),
        feedback(5, "evt-4"),
        dead_letter(7, original_seq=4),
    ]
    staged.append(delivery("SIGNALS", "signals.task.synced", 99, b""))  # poison: staged as it came, like the rest
    manifest = staging.stage(staged, batch_id="b-1")

    assert manifest.batch_id == "b-1"
    assert manifest.counts == {"SIGNALS": 4, "FEEDBACK": 1, "DEADLETTER": 1}
    assert manifest.seq_ranges == {"SIGNALS": [10, 99], "FEEDBACK": [5, 5], "DEADLETTER": [7, 7]}
    assert manifest.size == 6
    assert staging.batches() == [manifest]

    batch = staging.path("b-1")
    assert sorted(p.name for p in batch.iterdir()) == ["deliveries.parquet", "manifest.json"]

    table = staging.deliveries("b-1", columns=["reply", "num_delivered"])
    assert table.column_names == ["reply", "num_delivered"]
    got = sorted(zip(table.column("reply").to_pylist(), table.column("num_delivered").to_pylist(), strict=True))
    assert got == sorted((d.reply, d.num_delivered) for d in staged)

    rows: list[dict[str, Any]] = staging.deliveries("b-1").to_pylist()
    assert [delivery_from_row(r) for r in rows] == staged


def test_batches_are_listed_oldest_first(tmp_path: Path) -> None:
    """Batches are settled in the order they were fetched."""
    staging = FolderStaging(tmp_path / "staging")
    first = staging.stage(([signal(1, "a")]), batch_id="zzz")
    second = staging.stage(([signal(2, "b")]), batch_id="aaa")
    assert [m.batch_id for m in staging.batches()] == [first.batch_id, second.batch_id]


def test_generated_batch_ids_are_unique(tmp_path: Path) -> None:
    """Two batches staged in the same second must not overwrite each other."""
    staging = FolderStaging(tmp_path / "staging")
    ids = {staging.stage([signal(i, f"e{i}")]).batch_id for i in range(3)}
    assert len(ids) == 3
    assert {m.batch_id for m in staging.batches()} == ids


def test_remove_deletes_the_batch(tmp_path: Path) -> None:
    """A settled batch is gone from disk and from the listing."""
    staging = FolderStaging(tmp_path / "staging")
    keep = staging.stage([signal(1, "a")])
    gone = staging.stage([signal(2, "b")])
    staging.remove(gone.batch_id)
    assert not staging.path(gone.batch_id).exists()
    assert staging.batches() == [keep]
    staging.remove(gone.batch_id)  # removing twice is harmless


def test_batches_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    """Before the first fetch there is no staging folder; that is not an error."""
    assert FolderStaging(tmp_path / "nothing-here").batches() == []


def test_leftover_temp_folder_is_ignored_then_removed_when_stale(tmp_path: Path) -> None:
    """A crashed tick's half-written batch is never settled (its messages come back) and is cleaned up later."""
    staging = FolderStaging(tmp_path / "staging")
    real = staging.stage([signal(1, "a")])
    tmp = staging.root / ".tmp-crashed"
    tmp.mkdir()
    (tmp / "deliveries.parquet").write_bytes(b"partial")
    (tmp / "manifest.json").write_text(json.dumps(real.__dict__))

    assert staging.batches() == [real]
    assert tmp.exists(), "a fresh temp folder may still be written by a running tick"

    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(tmp, (old, old))
    assert staging.batches() == [real]
    assert not tmp.exists()


def test_folder_without_manifest_is_not_a_batch(tmp_path: Path) -> None:
    """Only complete batches (with manifest.json) are listed."""
    staging = FolderStaging(tmp_path / "staging")
    (staging.root / "stray").mkdir(parents=True)
    (staging.root / "file.txt").write_text("x")
    assert staging.batches() == []


def test_check_writable_on_a_writable_folder(tmp_path: Path) -> None:
    """The probe creates the folder and leaves nothing behind."""
    staging = FolderStaging(tmp_path / "new" / "staging")
    staging.check_writable()
    assert list(staging.root.iterdir()) == []


# -- broker helpers -------------------------------------------------------------------------


def test_parse_reply_v1_nine_tokens() -> None:
    """$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>."""
    assert parse_reply("$JS.ACK.SIGNALS.fp-signals.3.17.9.1764219600123456789.5") == (
        "SIGNALS",
        3,
        17,
        1764219600123456789,
    )


def test_parse_reply_v2_twelve_tokens() -> None:
    """$JS.ACK.<domain>.<acchash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<token>."""
    reply = "$JS.ACK._.ACCHASH.FEEDBACK.fp-feedback.2.40.31.1764219600123456789.0.Xy7z"
    assert parse_reply(reply) == ("FEEDBACK", 2, 40, 1764219600123456789)


@pytest.mark.parametrize("reply", ["", "_INBOX.abc", "$JS.ACK.SIGNALS.c.1.2.3", "$JS.ACK.SIGNALS.c.x.17.9.1.0"])
def test_parse_reply_rejects_other_subjects(reply: str) -> None:
    """A reply that is not an ack subject must be an error, not a wrong sequence number."""
    with pytest.raises(ValueError):
        parse_reply(reply)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://user:pw@host:4222", "nats://***@host:4222"),
        ("nats://token@host:4222", "nats://***@host:4222"),
        ("nats://a:b@h1:4222,tls://c:d@h2:4222", "nats://***@h1:4222,tls://***@h2:4222"),
        ("nats://host:4222", "nats://host:4222"),
    ],
)
def test_redact_hides_credentials(url: str, shown: str) -> None:
    """Server URLs reach logs and the Dagster UI; passwords and tokens must not."""
    assert redact(url) == shown
    assert "pw" not in redact(url)


def test_ts_from_nats_nanoseconds() -> None:
    """NATS prints nanoseconds; they are truncated to microseconds, not rejected."""
    assert ts_from_nats("2026-11-27T05:00:00.123456789Z") == datetime(2026, 11, 27, 5, 0, 0, 123456, tzinfo=UTC)
    assert ts_from_nats("2026-11-27T05:00:00Z") == datetime(2026, 11, 27, 5, 0, tzinfo=UTC)
    assert ts_from_nats("2026-11-27T07:00:00.5+02:00") == datetime(2026, 11, 27, 5, 0, 0, 500000, tzinfo=UTC)


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00Z", None, "", "not a time"])
def test_ts_from_nats_never(text: str | None) -> None:
    """The zero time means 'never' (e.g. no message yet) and must not be shown as year 1."""
    assert ts_from_nats(text) is None
