"""End to end through the real `dagster-daemon` (sensor in its code server, runs in their own
processes) and a real nats-server: the promises users buy, checked from the outside."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import dagster as dg
import pytest

from feature_pipeline.cli import publish_events
from feature_pipeline_tests.conftest import Pipeline, run, stream_messages, wait_for
from feature_pipeline_tests.test_sensor_tick import _publish, _synced

pytestmark = pytest.mark.e2e

SIGNAL_SUBJECTS = ["signals.task.synced", "signals.task.completed", "signals.session.started"]
FEEDBACK_SUBJECTS = ["feedback.recommendation.shown", "feedback.recommendation.accepted"]


def _features(p: Pipeline, user: str) -> dict[str, Any] | None:
    out = p.cli("features", user)
    return json.loads(out.stdout) if out.returncode == 0 else None


def test_event_to_feature_row_poison_and_health(make_pipeline: Any) -> None:
    """publish → run succeeds → row bumped → acked (lag 0), the run log names the event;
    poison is dead-lettered with its reason while its batch-mates are stored; health shows it all."""
    p = make_pipeline()
    run(_publish(p.nats.url, [_synced("evt-e2e-1", "u-42", total=12)]))
    row = wait_for(lambda: _features(p, "u-42"), 90, "u-42's feature row")
    assert row["signal_count_total"] == 1 and row["latest_tasks_total"] == 12
    wait_for(p.settled, 30, "the batch to be acked and unstaged")

    (success,) = p.runs(dg.DagsterRunStatus.SUCCESS)
    with p.instance() as inst:
        messages = [e.message for e in inst.all_logs(success.run_id)]
    assert any("evt-e2e-1" in m for m in messages), "the run log names the event it stored"

    run(_publish(p.nats.url, [_synced("evt-e2e-2", "u-42", total=20)]))
    wait_for(lambda: (_features(p, "u-42") or {}).get("signal_count_total") == 2, 60, "the row to be bumped to 2")
    assert _features(p, "u-42")["latest_tasks_total"] == 20

    run(
        _publish(
            p.nats.url,
            [
                _synced("evt-mate-1", "u-7"),
                ("signals.task.synced", b"\xff\xfe not json"),
                ("signals.task.synced", b'{"id": "evt-no-user", "type": "task.synced"}'),
                _synced("evt-mate-2", "u-7"),
            ],
        )
    )
    wait_for(lambda: len(p.query("SELECT * FROM dead_letters")) == 2, 90, "two dead_letters rows")
    wait_for(p.settled, 30, "caught up after the poison")
    reasons = sorted(r[0] for r in p.query("SELECT reason FROM dead_letters"))
    assert reasons[0].startswith("invalid envelope: ") and "user_id: Field required" in reasons[0]
    assert reasons[1].startswith("not valid JSON")
    assert {"evt-mate-1", "evt-mate-2"} <= set(p.stored_ids())
    dead = run(stream_messages(p.nats.url, "DEADLETTER"))
    assert sorted(m.headers["FP-Reason"] for m in dead) == reasons

    health = p.cli("health", "--json")
    assert health.returncode == 0, health.stdout + health.stderr
    report = json.loads(health.stdout)
    signals = next(s for s in report["streams"] if s["stream"] == "SIGNALS")
    assert signals["consumer_lag"] == 0 and signals["last_message_at"] is not None
    assert signals["seconds_since_last_message"] > 0
    assert signals["dead_letters"] == 2
    assert report["last_ingest_run"]["status"] == "SUCCESS"

    with p.instance() as inst:
        obs = inst.fetch_observations(dg.AssetKey(["nats", "signals"]), limit=1).records
    assert obs, "the sensor records observations on the stream asset"
    meta = obs[0].asset_observation.metadata
    assert meta["consumer_lag"].value == 0 and "last_message_at" in meta


def test_nats_killed_while_a_batch_is_staged_loses_and_doubles_nothing(make_pipeline: Any) -> None:
    """SIGKILL nats-server as soon as a batch is staged; its run goes on, settle waits for NATS;
    restart it on the same store and publish more: every event is stored exactly once."""
    p = make_pipeline()
    users = [f"u-{i}" for i in range(20)]
    first = run(
        publish_events(p.nats.url, subjects=SIGNAL_SUBJECTS + FEEDBACK_SUBJECTS, users=users, count=300, rate=None)
    )
    wait_for(p.staged, 60, "a staged batch", interval=0.05)
    p.nats.kill()
    wait_for(lambda: p.runs(dg.DagsterRunStatus.SUCCESS), 60, "the run to finish without NATS")
    assert p.staged(), "a batch whose settle cannot reach NATS stays in flight"
    health = p.cli("health", "--json")
    assert health.returncode == 2 and json.loads(health.stdout)["status"] == "down"
    p.nats.start()
    second = run(publish_events(p.nats.url, subjects=SIGNAL_SUBJECTS, users=users, count=200, rate=None))
    published = first + second
    wait_for(lambda: len(p.stored_ids()) >= len(published) and p.settled(), 120, "all events stored and acked")

    stored = p.stored_ids()
    assert sorted(stored) == sorted(published), "nothing lost, nothing stored twice"
    totals = dict(p.query("SELECT user_id, signal_count_total FROM user_features"))
    per_user = Counter(
        r[0] for r in p.query("SELECT user_id FROM signal_events")
    )  # recomputation straight from raw rows
    assert totals == {u: per_user.get(u, 0) for u in totals}
    assert sum(totals.values()) == len(p.query("SELECT 1 FROM signal_events")), "no event counted twice"
    assert not p.runs(dg.DagsterRunStatus.FAILURE)


def test_failing_runs_redeliver_then_dead_letter_and_recover(make_pipeline: Any) -> None:
    """Every run fails (injected): the message is redelivered NATS_MAX_DELIVER=3 times, then
    dead-lettered with the run's error; once runs work again the dead letter lands in the table."""
    p = make_pipeline({"FEATURE_PIPELINE_FAULTS": "fail-run", "NATS_MAX_DELIVER": "3"})
    run(_publish(p.nats.url, [_synced("evt-doomed", "u-9")]))
    dead = wait_for(lambda: run(stream_messages(p.nats.url, "DEADLETTER")), 150, "the dead letter")
    assert dead[0].headers["FP-Delivery-Count"] == "3"
    assert "fail-run" in dead[0].headers["FP-Reason"]
    assert len(p.runs(dg.DagsterRunStatus.FAILURE)) >= 3, "one failed run per delivery"
    assert p.lag()["SIGNALS"] == 0, "the original is TERMed, not left pending"

    p.stop_daemon()  # the operator fixes the cause and restarts, with batches possibly in flight
    p.extra_env.pop("FEATURE_PIPELINE_FAULTS")
    p.start_daemon()
    wait_for(lambda: p.query("SELECT original_seq, delivery_count, reason FROM dead_letters"), 120, "dead_letters row")
    wait_for(p.settled, 60, "caught up")
    ((seq, count, reason),) = p.query("SELECT original_seq, delivery_count, reason FROM dead_letters")
    assert (seq, count) == (1, 3) and "gave up after 3 deliveries" in reason
    assert p.stored_ids() == []
