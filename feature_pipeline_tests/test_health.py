"""How ingest_running grades what the instance says of the ingest sensor (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from feature_pipeline.health import TICK_STALE_SECONDS, SensorState, ingest_grade

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
