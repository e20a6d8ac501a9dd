"""Replay from the stream: the disaster test (delete the DuckDB file, replay, every row is back as it was).

Real nats-server, real DuckDB file, the ingest path driven by ticks of the batch lifecycle, and the
replay job executed in-process as the UI's launchpad would launch it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest

from feature_pipeline.envelopes import make_envelope
from feature_pipeline.settings import Settings
from feature_pipeline.testing import consumer_states, run
from feature_pipeline_tests.helpers import Lifecycle, definitions, publish

NOW = datetime.now(UTC)
# Far from every window edge (24 h, 7 d): the rows cannot change in the seconds the test takes.
AGES = [timedelta(hours=1), timedelta(hours=5), timedelta(days=3), timedelta(days=20)]


def _events(n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        user, when = f"u-{i % 7}", NOW - AGES[i % len(AGES)]
        if i % 3 == 2:
            kind = ("recommendation.shown", "recommendation.accepted")[i % 2]
            out.append(
                (
                    f"feedback.{kind}",
                    make_envelope(f"f-{i}", kind, user, when, {"recommendation_id": "r", "item_id": "i"}),
                )
            )
        else:
            data = {"provider": "todoist", "tasks_total": i, "tasks_completed": i // 2}
            out.append(("signals.task.synced", make_envelope(f"s-{i}", "task.synced", user, when, data)))
    out.append(("signals.task.synced", b'{"id": "broken"'))  # poison: dead-lettered by the live pipeline
    return out


def _dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        feature_cols = "* EXCLUDE (updated_at)"
        return {
            "signal_events": con.execute(
                "SELECT * EXCLUDE (ingested_at, batch_id) FROM signal_events ORDER BY 1"
            ).fetchall(),
            "feedback_events": con.execute(
                "SELECT * EXCLUDE (ingested_at, batch_id) FROM feedback_events ORDER BY 1"
            ).fetchall(),
            "dead_letters": con.execute(
                "SELECT * EXCLUDE (recorded_at, batch_id) FROM dead_letters ORDER BY 1, 3"
            ).fetchall(),
            "user_features": con.execute(f"SELECT {feature_cols} FROM user_features ORDER BY user_id").fetchall(),
        }
    finally:
        con.close()


def _replay(inst: dg.DagsterInstance, settings: Settings, **config: Any) -> dg.ExecuteInProcessResult:
    return (
        definitions(settings)
        .resolve_job_def("replay_stream")
        .execute_in_process(
            run_config={"ops": {"replay_range": {"config": config}}},
            instance=inst,
            raise_on_error=False,
        )
    )


def _restored(result: dg.ExecuteInProcessResult) -> int:
    mats = result.asset_materializations_for_node("replay_range")
    return next(m.metadata["restored"].value for m in mats)  # type: ignore[union-attr]


def test_delete_the_store_replay_and_every_row_is_back(lifecycle: Lifecycle, settings: Settings) -> None:
    run(publish(settings.nats_url, _events(60)))
    lifecycle.drain()
    db = Path(settings.feature_store_path)
    before = _dump(db)
    assert len(before["signal_events"]) == 40 and len(before["feedback_events"]) == 20
    assert len(before["dead_letters"]) == 1 and len(before["user_features"]) == 7
    consumers_before = run(consumer_states(settings.nats_url, settings.durable_prefix))

    db.unlink()
    with dg.instance_for_test() as inst:
        for stream in ("SIGNALS", "FEEDBACK", "DEADLETTER"):
            result = _replay(inst, settings, stream=stream, chunk=25)  # several chunks per stream
            assert result.success, stream
        assert _dump(db) == before

        # The durable consumers were not touched: same delivered and ack floor, nothing pending.
        after = run(consumer_states(settings.nats_url, settings.durable_prefix))
        for name, info in consumers_before.items():
            assert (after[name].delivered, after[name].ack_floor) == (info.delivered, info.ack_floor), name
            assert after[name].num_pending == after[name].num_ack_pending == 0

        # Replaying again changes nothing: every message is absorbed.
        again = _replay(inst, settings, stream="SIGNALS", start_seq=1)
        assert again.success and _restored(again) == 0
        assert _dump(db) == before


def test_replay_a_range_restores_only_that_range(lifecycle: Lifecycle, settings: Settings) -> None:
    run(publish(settings.nats_url, _events(12)))
    lifecycle.drain()
    db = Path(settings.feature_store_path)
    con = duckdb.connect(str(db))
    con.execute("DELETE FROM signal_events WHERE stream_seq BETWEEN 3 AND 5")
    con.close()
    with dg.instance_for_test() as inst:
        result = _replay(inst, settings, stream="SIGNALS", start_seq=2, end_seq=6)
        assert result.success and _restored(result) == 3
        mats = result.asset_materializations_for_node("replay_range")
        assert {tuple(m.asset_key.path) for m in mats} == {("signal_events",), ("user_features",)}
        assert next(m.metadata["replayed_from_seq"].value for m in mats) == 2  # type: ignore[union-attr]
        assert next(m.metadata["replayed_to_seq"].value for m in mats) == 6  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"stream": "LOGS"}, "stream must be one of SIGNALS, FEEDBACK, DEADLETTER"),
        ({"stream": "SIGNALS", "start_seq": 5, "start_time": "2026-11-27T00:00:00Z"}, "not both"),
        ({"stream": "SIGNALS", "start_time": "yesterday"}, "RFC 3339"),
        ({"stream": "SIGNALS", "start_time": "2026-11-27T00:00:00"}, "needs a time zone"),
        ({"stream": "SIGNALS", "start_seq": 9, "end_seq": 3}, "before start_seq"),
    ],
)
def test_bad_replay_config_fails_the_run_with_the_reason(
    settings: Settings, config: dict[str, Any], message: str
) -> None:
    with dg.instance_for_test() as inst:
        result = _replay(inst, settings, **config)
        assert not result.success
        failure = result.failure_data_for_node("replay_range")
        assert failure is not None and message in failure.error.message  # type: ignore[union-attr]
