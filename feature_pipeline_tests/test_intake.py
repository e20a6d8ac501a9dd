"""The run's intake of a staged batch (`store.intake`): the vectorized check agrees with the pydantic models.

Every body below is staged as the sensor stages it and read by `intake.load` on a real DuckDB
connection. The SQL may leave any message to the models, but a message it accepts must be one the
models accept, with exactly the values they give; and the intake as a whole (SQL, then the models
for the rest) must give what `validate` gives, poison reasons included.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from feature_pipeline import streams
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.contract import contract_for
from feature_pipeline.envelopes import Event, PoisonMessage, validate_full
from feature_pipeline.ingest.staging import FolderStaging
from feature_pipeline.samples import SAMPLE_SUBJECTS, sample_event
from feature_pipeline.store import intake
from feature_pipeline.streams import StreamSpec
from feature_pipeline_tests.test_staging import (
    NOW,
    STORED_AT,
    SYNCED,
    dead_letter,
    delivery,
    feedback,
    signal,
)

# A team's source whose models are the packaged signal models and whose unknown types are poison.
ORDERS = StreamSpec(
    "orders", "ORDERS", ("orders.>",), "order_events", True, "", "feature_pipeline.envelopes:SIGNAL_MODELS", True
)
SOURCES = (*streams.PACKAGED, ORDERS)
STREAM_OF = {"signals": "SIGNALS", "feedback": "FEEDBACK", "orders": "ORDERS"}


def load(tmp_path: Path, deliveries: Sequence[Delivery], pipeline: str = "feature-pipeline") -> dict[str, Any]:
    """Stage `deliveries` and take them in: the events (in staging order), dead-letter rows and the Intake."""
    staging = FolderStaging(tmp_path / "staging")
    manifest = staging.stage(deliveries)
    con = duckdb.connect()
    try:
        path = str(staging.path(manifest.batch_id) / "deliveries.parquet")
        taken = intake.load(con, path, contract_for(SOURCES), SOURCES, pipeline)
        events = con.execute(f"SELECT * FROM {intake.STAGED} ORDER BY stream, stream_seq").fetch_df()
        dead = con.execute(f"SELECT * FROM {intake.STAGED_DEAD_LETTERS} ORDER BY deadletter_seq").fetchall()
        by_sql = _accepted_by_sql(con, path)
    finally:
        con.close()
    return {"events": events.to_dict("records"), "dead": dead, "intake": taken, "by_sql": by_sql}


def _accepted_by_sql(con: duckdb.DuckDBPyConnection, path: str) -> dict[tuple[str, int], dict[str, Any]]:
    """What the vectorized pass alone accepts (the rules table `load` left behind)."""
    checks = intake._rules(con, path, contract_for(SOURCES), SOURCES)
    rows = con.execute(intake._accepted_sql(checks), {"p": path}).fetch_df().to_dict("records")
    return {(r["stream"], r["stream_seq"]): r for r in rows}


def as_event(row: dict[str, Any]) -> Event:
    return Event(
        event_id=row["event_id"],
        type=row["type"],
        user_id=row["user_id"],
        occurred_at=row["occurred_at"].to_pydatetime().astimezone(UTC),
        schema_version=int(row["schema_version"]),
        data_json=row["data"],
        known_type=bool(row["known_type"]),
    )


# -- what a batch becomes ------------------------------------------------------------------------


def test_events_poison_and_dead_letters_are_sorted_out(tmp_path: Path) -> None:
    """Valid events are typed for the raw tables, poison is set aside with the models' reason, and dead-letter
    copies become dead_letters rows."""
    from feature_pipeline.envelopes import make_envelope

    good_s = signal(10, "evt-1", num_delivered=2)
    good_f = feedback(3, "evt-2")
    bad = delivery("SIGNALS", "signals.task.synced", 11, b"not json")
    mismatched = delivery("SIGNALS", "signals.task.completed", 12, make_envelope("e", "task.synced", "u", NOW, SYNCED))
    out = load(tmp_path, [good_s, bad, good_f, mismatched, dead_letter(7, original_seq=4)])

    assert [(d.stream_seq, reason.split(":")[0]) for d, reason in out["intake"].poison] == [
        (11, "not valid JSON"),
        (12, "type 'task.synced' does not match subject 'signals.task.completed' (expected 'task.completed')"),
    ]
    assert [e["event_id"] for e in out["events"]] == ["evt-2", "evt-1"]
    first = next(e for e in out["events"] if e["event_id"] == "evt-1")
    assert (first["stream"], first["subject"], first["stream_seq"], first["num_delivered"]) == (
        "SIGNALS",
        "signals.task.synced",
        10,
        2,
    )
    assert (first["user_id"], first["type"], first["known_type"]) == ("u-1", "task.synced", True)
    assert first["occurred_at"].to_pydatetime() == NOW and json.loads(first["data"]) == SYNCED
    assert abs(first["received_at"].to_pydatetime() - STORED_AT) <= timedelta(microseconds=1)
    assert out["dead"] == [
        (
            "SIGNALS",
            "signals.task.synced",
            4,
            5,
            "gave up after 5 deliveries",
            datetime(2026, 11, 27, 6, 0, 0, 500000, tzinfo=UTC),
            7,
            b"original body",
        )
    ]
    assert set(out["by_sql"]) == {("SIGNALS", 10), ("FEEDBACK", 3)}, "the valid ones took the vectorized path"


def test_another_pipelines_dead_letter_copy_is_not_recorded(tmp_path: Path) -> None:
    """Copies this pipeline made and copies without FP-Pipeline are recorded; another pipeline's are left to it
    (they are acked with the batch all the same)."""
    ours = dead_letter(1, 10, **{streams.H_PIPELINE: "feature-pipeline"})
    theirs = dead_letter(2, 11, **{streams.H_PIPELINE: "feature-pipeline-ads"})
    unnamed = dead_letter(3, 12)
    out = load(tmp_path, [ours, theirs, unnamed, signal(4, "evt-4")])
    assert sorted(row[2] for row in out["dead"]) == [10, 12]


def test_a_foreign_or_malformed_dead_letter_is_recorded_with_safe_values(tmp_path: Path) -> None:
    """A message someone else published to deadletter.> has no FP headers; unparseable counts and times fall
    back: recorded, never a failed batch."""
    foreign = delivery("DEADLETTER", "deadletter.signals.task.synced", 42, b"?", headers=None)
    malformed = dead_letter(8, original_seq=4, **{streams.H_DELIVERIES: "x", streams.H_AT: "yesterday"})
    rows = {row[6]: row for row in load(tmp_path, [foreign, malformed])["dead"]}
    assert rows[42][:4] == ("DEADLETTER", "signals.task.synced", 42, 0) and "no reason given" in rows[42][4]
    assert rows[8][3] == 0
    for row in rows.values():
        assert abs(row[5] - STORED_AT) <= timedelta(microseconds=1)


def test_a_stream_that_is_no_longer_a_source_fails_in_words(tmp_path: Path) -> None:
    stray = delivery("PAYMENTS", "payments.made", 1, b"{}")
    with pytest.raises(intake.UnknownSource, match=r"not sources in the feature registry \(1 from stream PAYMENTS\)"):
        load(tmp_path, [signal(1, "evt-1"), stray])


# -- the vectorized check agrees with the models -------------------------------------------------

BASE: dict[str, Any] = {
    "id": "evt-1",
    "occurred_at": "2026-11-27T05:00:00Z",
    "user_id": "u-1",
    "schema_version": 1,
}
DATA = {
    "task.synced": {"provider": "todoist", "tasks_total": 12, "tasks_completed": 3},
    "task.completed": {"task_id": "t-1"},
    "session.started": {},
    "recommendation.shown": {"recommendation_id": "r-1", "item_id": "i-1"},
}
SUBJECTS = [
    "signals.task.synced",
    "signals.task.completed",
    "signals.session.started",
    "signals.brand.new",
    "feedback.recommendation.shown",
    "feedback.something.else",
    "orders.task.synced",
    "orders.not.modelled",
]
VALUES: dict[str, list[Any]] = {
    "id": ["evt-1", "", " ", "a b", "a\tb", "é", "x" * 256, "x" * 257, 7, None, "\x7f", "a\u2028"],
    "user_id": ["u-1", "", "  u", "u\x00", "ü-1", "u" * 300, 1.5, ["u"]],
    "occurred_at": [
        "2026-11-27T05:00:00Z",
        "2026-11-27T05:00:00.123456+01:30",
        "2026-11-27T05:00:00.1234567Z",
        "2026-11-27t05:00:00z",
        "2026-11-27 05:00:00Z",
        "2026-02-30T05:00:00Z",
        "2026-11-27T24:00:00Z",
        "2026-11-27T23:59:60Z",
        "2026-11-27T05:00:00+24:00",
        "2026-11-27T05:00:00-23:59",
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+23:59",
        "1899-12-31T23:59:59Z",
        "2026-11-27T05:00:00",
        "2026-11-27",
        20261127,
    ],
    "schema_version": [1, 2, 0, -1, 2**31 - 1, 2**31, 1.0, True, "1", None, 10**20],
    "type": ["<subject>", "task.synced", "", "Task.Synced"],
}
DATA_VALUES: list[Any] = [
    "todoist", "", " ", "ü", "a\\b", 'q"uote', 0, -0, 12, -5, 2**63 - 1, 2**63, 10**15, 10**16, 1.5, 1e16, 1e-5,
    True, None, [1, 2], {"k": 1}, {"k": {"k": 2}}, float("nan"), float("inf"),
]  # fmt: skip
RAW_BODIES = [
    b'{"id":"a","id":"b","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u",'
    b'"schema_version":1,"data":{"task_id":"t"}}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1,'
    b'"data":{"task_id":"t","task_id":"u"}}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1,'
    b'"data":{"task_id":"t","x":{"y":1,"y":2}}}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1,'
    b'"data":{"task_id":"t",}}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1,'
    b'"data":{"task_id":"t","n":NaN}}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1,'
    b'"data":{"task_id":"t","n":-inf}}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1,'
    b'"data":{"task_id":"t","n":1e400}}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1,'
    b'"data":{"task_id":"t","n":[1,]}}',
    b'{"id":"\\u0061","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u",'
    b'"schema_version":1,"data":{"task_id":"t"}}',
    b' {"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1} ',
    b'\xef\xbb\xbf{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u",'
    b'"schema_version":1,"data":{"task_id":"t"}}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1,'
    b'"data":{"task_id":"\xff"}}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1,'
    b'"data":null}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":1,'
    b'"data":[]}',
    b'{"id":"a","type":"task.completed","occurred_at":"2026-11-27T05:00:00Z","user_id":"u","schema_version":01}',
    b"[]",
    b"",
    b"null",
    b'"text"',
]


def _bodies(rng: random.Random, n: int) -> Iterator[tuple[str, bytes]]:
    """(subject, body): the documented envelope with fields swapped for odd values, odd data, removed fields,
    raw byte edits, and the hand-made bodies above."""
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        event_type = subject.split(".", 1)[1]
        doc: dict[str, Any] = {**BASE, "type": event_type, "data": dict(DATA.get(event_type, {"note": "x"}))}
        for field in rng.sample(sorted(VALUES), rng.randint(0, 2)):
            value = rng.choice(VALUES[field])
            doc[field] = event_type if value == "<subject>" else value
        for _ in range(rng.randint(0, 2)):
            doc["data"][rng.choice([*doc["data"], "extra"])] = rng.choice(DATA_VALUES)
        if rng.random() < 0.1:
            doc.pop(rng.choice(sorted(doc)))
        body = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        if rng.random() < 0.1:
            at = rng.randrange(len(body) + 1)
            body = body[:at] + bytes([rng.randrange(256)]) + body[at + rng.randint(0, 2) :]
        yield subject, body
    for raw in RAW_BODIES:
        yield "signals.task.completed", raw


def test_the_vectorized_check_never_disagrees_with_the_models(tmp_path: Path) -> None:
    rng = random.Random(20261202)
    cases = list(_bodies(rng, 4000))
    deliveries = [
        delivery(STREAM_OF[subject.split(".")[0]], subject, seq, body) for seq, (subject, body) in enumerate(cases, 1)
    ]
    out = load(tmp_path, deliveries)
    stored = {(e["stream"], e["stream_seq"]): as_event(e) for e in out["events"]}
    poison = {(d.stream, d.stream_seq): reason for d, reason in out["intake"].poison}
    contract = contract_for(SOURCES)
    accepted_by_sql = 0
    for d in deliveries:
        key = (d.stream, d.stream_seq)
        rule = contract.rule(d.stream, d.subject)
        try:
            expected: Event | str = validate_full(d.data, rule)
        except PoisonMessage as exc:
            expected = str(exc)
        if key in out["by_sql"]:
            accepted_by_sql += 1
            assert as_event(out["by_sql"][key]) == expected, (d.subject, d.data)
        assert stored.get(key, poison.get(key)) == expected, (d.subject, d.data)
    valid = len(stored)
    assert out["intake"].events == valid and out["intake"].checked_by_models == len(deliveries) - accepted_by_sql
    assert valid > 500 and len(poison) > 500, "the corpus holds plenty of both"
    assert accepted_by_sql > 0.5 * valid, f"the SQL should take most valid messages: {accepted_by_sql} of {valid}"


def test_what_producers_usually_send_takes_the_vectorized_path(tmp_path: Path) -> None:
    """Sample events of every packaged subject, with microsecond timestamps, UUID ids and non-ASCII-free data: the
    SQL takes every one (the models see none), so the run's cost is the vectorized pass's."""
    rng = random.Random(7)
    start = datetime(2026, 12, 2, 19, 3, 58, 312443, tzinfo=UTC)
    deliveries = []
    for seq in range(1, 1001):
        subject = SAMPLE_SUBJECTS[seq % len(SAMPLE_SUBJECTS)]
        _, body = sample_event(subject, f"u-{seq % 37}", start + timedelta(microseconds=seq * 7919), rng)
        deliveries.append(delivery(STREAM_OF[subject.split(".")[0]], subject, seq, body))
    out = load(tmp_path, deliveries)
    assert out["intake"].checked_by_models == 0 and out["intake"].events == len(deliveries) == len(out["by_sql"])
