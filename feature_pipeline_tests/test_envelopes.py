"""The event contract: what `validate` accepts, how it normalises it, and why it rejects the rest.

The text of a `PoisonMessage` becomes the dead-letter reason a person reads, so the
rejection tests assert that it names the offending field or the problem.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from feature_pipeline.contract import validate, validate_full
from feature_pipeline.envelopes import Event, PoisonMessage, make_envelope

SUBJECT = "signals.task.synced"
DOC_BODY = (
    b'{"id":"evt-1","type":"task.synced","occurred_at":"2026-11-27T05:00:00Z","user_id":"u-42",'
    b'"schema_version":1,"data":{"provider":"todoist","tasks_total":12,"tasks_completed":3}}'
)
MISSING = object()


def envelope(**changes: Any) -> bytes:
    """The documented envelope with some fields replaced (or removed with MISSING)."""
    doc: dict[str, Any] = json.loads(DOC_BODY)
    for key, value in changes.items():
        if value is MISSING:
            doc.pop(key)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def poison_text(subject: str, body: bytes) -> str:
    """The dead-letter reason `validate` gives for a body it must reject."""
    with pytest.raises(PoisonMessage) as info:
        validate(subject, body)
    return str(info.value)


# -- accepted -------------------------------------------------------------------------------


def test_documented_envelope_is_accepted() -> None:
    """The example in the contract must pass, or every producer following it is dead-lettered."""
    ev = validate(SUBJECT, DOC_BODY)
    assert ev == Event(
        event_id="evt-1",
        type="task.synced",
        user_id="u-42",
        occurred_at=datetime(2026, 11, 27, 5, 0, tzinfo=UTC),
        schema_version=1,
        data_json='{"provider":"todoist","tasks_total":12,"tasks_completed":3}',
        known_type=True,
    )


def test_occurred_at_with_offset_is_normalised_to_utc() -> None:
    """Windows are computed in UTC; an offset must be converted, not dropped."""
    ev = validate(SUBJECT, envelope(occurred_at="2026-11-27T06:30:00.250+01:30"))
    assert ev.occurred_at == datetime(2026, 11, 27, 5, 0, 0, 250000, tzinfo=UTC)
    assert ev.occurred_at.utcoffset() == timedelta(0)


def test_lowercase_z_and_space_separator_are_rfc3339() -> None:
    """RFC 3339 allows `z` and a space instead of `T`; both mean the same instant."""
    ev = validate(SUBJECT, envelope(occurred_at="2026-11-27 05:00:00z"))
    assert ev.occurred_at == datetime(2026, 11, 27, 5, 0, tzinfo=UTC)


def test_unknown_type_is_accepted_but_flagged() -> None:
    """Producers may ship new event types before we model them; they are stored, not dead-lettered."""
    ev = validate("signals.habit.logged", envelope(type="habit.logged", data={"anything": [1, 2]}))
    assert ev.known_type is False
    assert ev.type == "habit.logged"
    assert json.loads(ev.data_json) == {"anything": [1, 2]}


def test_extra_fields_in_known_data_are_kept() -> None:
    """Producers may add data fields; the typed check must not strip them from what is stored."""
    data = {"provider": "todoist", "tasks_total": 1, "tasks_completed": 0, "new_field": "x"}
    ev = validate(SUBJECT, envelope(data=data))
    assert json.loads(ev.data_json) == data


def test_data_defaults_to_empty_object_for_types_without_fields() -> None:
    """session.started carries no data; a missing `data` must not be poison."""
    ev = validate("signals.session.started", envelope(type="session.started", data=MISSING))
    assert ev.data_json == "{}"
    assert ev.known_type is True


def test_make_envelope_round_trips_through_validate() -> None:
    """`make_envelope` feeds the CLI publisher and the tests; what it builds must be valid as is."""
    when = datetime(2026, 11, 27, 6, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    data = {"recommendation_id": "r-1", "item_id": "i-9", "score": 0.5}
    body = make_envelope("evt-9", "recommendation.accepted", "u-7", when, data)
    ev = validate("feedback.recommendation.accepted", body)
    assert ev.event_id == "evt-9"
    assert ev.type == "recommendation.accepted"
    assert ev.user_id == "u-7"
    assert ev.occurred_at == when
    assert ev.occurred_at.utcoffset() == timedelta(0)
    assert ev.schema_version == 1
    assert json.loads(ev.data_json) == data
    assert ev.known_type is True


# -- rejected -------------------------------------------------------------------------------


def test_not_json_is_poison() -> None:
    """Garbage bytes can never be stored; the reason must say it is not JSON."""
    assert "not valid JSON" in poison_text(SUBJECT, b"hello, world")


def test_empty_body_is_poison() -> None:
    """An empty publish is a producer bug; the reason must say the body is empty."""
    assert "empty body" in poison_text(SUBJECT, b"")


def test_non_utf8_bytes_are_poison() -> None:
    """JSON is UTF-8; a Latin-1 producer must get a reason, not a crash in the sensor."""
    text = poison_text(SUBJECT, DOC_BODY.replace(b"u-42", b"u-\xff"))
    assert "JSON" in text
    assert "unicode" in text.lower()


def test_json_array_is_poison() -> None:
    """The envelope is an object; a batch-as-array from a producer must be rejected clearly."""
    text = poison_text(SUBJECT, b"[" + DOC_BODY + b"]")
    assert "envelope" in text
    assert "object" in text


@pytest.mark.parametrize("field", ["id", "user_id", "occurred_at", "schema_version"])
def test_missing_required_field_is_poison(field: str) -> None:
    """Each required envelope field, when missing, is named in the reason."""
    text = poison_text(SUBJECT, envelope(**{field: MISSING}))
    assert field in text
    assert "required" in text.lower()


def test_id_as_number_is_poison() -> None:
    """Ids are strings; a numeric id would silently collide with its string form elsewhere."""
    text = poison_text(SUBJECT, envelope(id=7))
    assert "id" in text
    assert "string" in text


@pytest.mark.parametrize("user_id", ["", "   ", "\t"])
def test_empty_or_blank_user_id_is_poison(user_id: str) -> None:
    """A blank user id would aggregate unrelated events into one feature row."""
    assert "user_id" in poison_text(SUBJECT, envelope(user_id=user_id))


@pytest.mark.parametrize(
    "event_id",
    [
        "evt\n1",
        "evt\r",
        "a\x1bb\x1bc",
        "\x1b[31mred",
        "evt\x00",
        "\x7f",
    ],
)
def test_control_characters_in_id_are_poison(event_id: str) -> None:
    """Ids are printed in logs, the CLI and the UI: any control character (e.g. an ANSI escape) is refused."""
    assert "id" in poison_text(SUBJECT, envelope(id=event_id))


def test_type_not_matching_subject_is_poison() -> None:
    """A task.completed published on signals.task.synced would be stored under the wrong contract."""
    text = poison_text(SUBJECT, envelope(type="task.completed"))
    assert "task.completed" in text
    assert SUBJECT in text
    assert "task.synced" in text


@pytest.mark.parametrize(
    "occurred_at",
    ["2026-11-27T05:00:00", "2026-11-27", 1764219600, "27/11/2026 05:00 UTC", None],
    ids=["no-zone", "date-only", "epoch-number", "free-text", "null"],
)
def test_bad_timestamp_is_poison(occurred_at: object) -> None:
    """Only zoned RFC 3339 instants are unambiguous; the reason says what is expected."""
    text = poison_text(SUBJECT, envelope(occurred_at=occurred_at))
    assert "occurred_at" in text
    assert "RFC 3339" in text


def test_nan_in_data_is_poison() -> None:
    """NaN is not JSON; DuckDB could not parse the stored data column."""
    body = DOC_BODY.replace(b'"tasks_completed":3}', b'"tasks_completed":3,"score":NaN}')
    assert "NaN" in poison_text(SUBJECT, body)


def test_infinity_in_data_is_poison() -> None:
    """A number too large for a double parses as Infinity, which is equally unstorable."""
    body = DOC_BODY.replace(b'"tasks_completed":3}', b'"tasks_completed":3,"score":1e400}')
    assert "Infinity" in poison_text(SUBJECT, body)


def test_tasks_total_as_string_is_poison() -> None:
    """Feature SQL casts tasks_total to BIGINT; a string would fail the whole batch later."""
    text = poison_text(SUBJECT, envelope(data={"provider": "todoist", "tasks_total": "12", "tasks_completed": 3}))
    assert "task.synced" in text
    assert "tasks_total" in text


def test_negative_tasks_total_is_poison() -> None:
    """A negative task count is meaningless and must not reach the features."""
    text = poison_text(SUBJECT, envelope(data={"provider": "todoist", "tasks_total": -1, "tasks_completed": 3}))
    assert "tasks_total" in text
    assert "greater than or equal to 0" in text


def test_recommendation_event_missing_item_id_is_poison() -> None:
    """Recommendation feedback without the item cannot be attributed."""
    body = envelope(type="recommendation.shown", data={"recommendation_id": "r-1"})
    text = poison_text("feedback.recommendation.shown", body)
    assert "recommendation.shown" in text
    assert "item_id" in text


def test_schema_version_zero_or_string_is_poison() -> None:
    """Versions start at 1 and are integers (strict: "1" is not 1)."""
    assert "schema_version" in poison_text(SUBJECT, envelope(schema_version=0))
    assert "schema_version" in poison_text(SUBJECT, envelope(schema_version="1"))


@pytest.mark.parametrize("occurred_at", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_timestamp_out_of_utc_range_is_poison_not_a_crash(occurred_at: str) -> None:
    """validate must only ever raise PoisonMessage: anything else would abort the run's intake of the whole batch."""
    assert "occurred_at" in poison_text(SUBJECT, envelope(occurred_at=occurred_at))


def test_tasks_total_beyond_bigint_is_poison() -> None:
    """The feature SQL casts tasks_total to BIGINT, so the contract must refuse what cannot be cast."""
    data = {"provider": "todoist", "tasks_total": 2**63, "tasks_completed": 3}
    assert "tasks_total" in poison_text(SUBJECT, envelope(data=data))


# -- property -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(
    subject=st.sampled_from([SUBJECT, "feedback.recommendation.shown", "signals.unknown.kind", "x"]),
    body=st.one_of(
        st.binary(max_size=400),
        st.builds(lambda b, i: DOC_BODY[:i] + b + DOC_BODY[i:], st.binary(max_size=8), st.integers(0, len(DOC_BODY))),
    ),
)
def test_arbitrary_bytes_give_an_event_or_poison(subject: str, body: bytes) -> None:
    """Any other exception would escape the intake and block the batch: only Event or PoisonMessage is allowed."""
    try:
        result = validate(subject, body)
    except PoisonMessage as exc:
        assert str(exc)
    else:
        assert isinstance(result, Event)
        assert result.occurred_at.utcoffset() == timedelta(0)


# -- the fast path agrees with the models ----------------------------------------------------

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    subject=st.sampled_from([SUBJECT, "signals.task.completed", "feedback.recommendation.shown", "signals.new.kind"]),
    fields=st.fixed_dictionaries(
        {},
        optional={
            "id": st.sampled_from(["evt-1", "", " ", "a\tb", 7]),
            "occurred_at": st.sampled_from(
                [
                    "2026-11-27T05:00:00Z",
                    "2026-11-27T05:00:00.123456+01:30",
                    "2026-11-27t05:00:00z",
                    "2026-11-27 05:00:00Z",
                    "2026-11-27T05:00:00.1234567Z",
                    "2026-02-30T05:00:00Z",
                    "9999-12-31T23:59:59-23:59",
                    "2026-11-27T05:00:00",
                ]
            ),
            "user_id": st.sampled_from(["u-1", "", "u\x00"]),
            "schema_version": st.sampled_from([1, 0, 2**31, True, "1"]),
            "data": st.dictionaries(
                st.sampled_from(
                    ["provider", "tasks_total", "tasks_completed", "task_id", "recommendation_id", "item_id", "extra"]
                ),
                _JSON_VALUES,
                max_size=4,
            ),
        },
    ),
)
@example(subject="signals.new.kind", fields={"data": {"provider": 6.103515625e-05}})  # 0.0000610… vs 6.1…e-05
def test_fast_path_never_disagrees_with_the_models(subject: str, fields: dict[str, Any]) -> None:
    """`validate` takes a shortcut for valid messages; it must return exactly what the pydantic models
    return, and send everything it is unsure of to them (so poison keeps the models' reasons)."""
    doc = {
        "id": "evt-1",
        "type": subject.split(".", 1)[1],
        "occurred_at": "2026-11-27T05:00:00Z",
        "user_id": "u-1",
        "schema_version": 1,
        **fields,
    }
    body = json.dumps(doc).encode()
    try:
        expected: Event | str = validate_full(subject, body)
    except PoisonMessage as exc:
        expected = str(exc)
    try:
        got: Event | str = validate(subject, body)
    except PoisonMessage as exc:
        got = str(exc)
    assert got == expected
