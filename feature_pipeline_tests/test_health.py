"""How ingest_running grades what the instance says of the ingest sensor (pure), and how a NATS
error reads in the checks (against a real nats-server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from feature_pipeline.broker.client import Broker, nats_problem
from feature_pipeline.defs.checks import read_stats
from feature_pipeline.health import TICK_STALE_SECONDS, SensorState, ingest_grade
from feature_pipeline.settings import Settings
from feature_pipeline.streams import SIGNALS, consumer_name
from feature_pipeline.testing import run
from feature_pipeline_tests.helpers import Lifecycle

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)


def test_a_running_sensor_with_a_recent_tick_passes() -> None:
    grade, text, age = ingest_grade(SensorState(True, NOW - timedelta(seconds=7)), NOW)
    assert (grade, age) == ("pass", 7) and text == "ingest_sensor is RUNNING; last tick 7 s ago"


def test_a_stopped_sensor_is_named_with_its_last_tick() -> None:
    grade, text, _ = ingest_grade(SensorState(False, NOW - timedelta(minutes=3)), NOW)
    assert grade == "error"
    assert text.startswith("ingest_sensor is STOPPED since 2026-11-30 11:57:00 UTC")


def test_a_running_sensor_whose_ticks_fail_is_an_error_with_the_failure() -> None:
    state = SensorState(True, NOW - timedelta(seconds=TICK_STALE_SECONDS + 1), "StoreBusy: could not open")
    grade, text, _ = ingest_grade(state, NOW)
    assert grade == "error" and "its last tick failed: StoreBusy: could not open" in text
    never = ingest_grade(SensorState(True, None), NOW)
    assert never[0] == "error" and "last completed tick was never" in never[1]


def test_a_sensor_the_daemon_has_not_recorded_yet_passes() -> None:
    assert ingest_grade(None, NOW) == ("pass", "ingest_sensor has not ticked yet", None)


def test_a_prefixed_instance_names_its_own_sensor() -> None:
    _, text, _ = ingest_grade(SensorState(False, NOW), NOW, "recs_ingest_sensor")
    assert text.startswith("recs_ingest_sensor is STOPPED")


def test_a_missing_consumer_is_said_in_words_not_as_a_bare_repr(settings: Settings, lifecycle: Lifecycle) -> None:
    """What stream_monitor's checks and tick line say when a consumer was deleted under a running pipeline
    (a real nats-server); nats-py's NotFoundError has no text of its own, so its repr said nothing."""
    lifecycle.tick()  # creates the streams and consumers

    async def delete_consumer() -> None:
        async with await Broker.connect(settings.nats_url) as broker:
            await broker.js.delete_consumer(SIGNALS.name, consumer_name(settings.durable_prefix, SIGNALS))

    run(delete_consumer())
    stats, problem, missing = read_stats(settings, "test")
    assert missing, "a deleted consumer reads as one that does not exist"
    assert stats == [] and problem is not None
    assert "a stream, consumer or bucket is missing (consumer not found)" in problem, problem
    assert "NotFoundError()" not in problem
    assert (
        nats_problem(TimeoutError(), "nats://u:secret@h:4222")
        == "NATS at nats://***@h:4222 did not answer in time (TimeoutError)"
    )
