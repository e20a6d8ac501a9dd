"""End to end through the real `dagster-daemon` (sensor in its code server, runs in their own
processes) and a real nats-server: the promises users buy, checked from the outside."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from feature_pipeline.broker.local import port_open
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.samples import publish_events
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.features import day_end
from feature_pipeline.testing import BIN, REPO, Pipeline, pool_children, run, stream_messages, wait_for
from feature_pipeline_tests.helpers import publish, synced

pytestmark = pytest.mark.e2e

SIGNAL_SUBJECTS = ["signals.task.synced", "signals.task.completed", "signals.session.started"]
FEEDBACK_SUBJECTS = ["feedback.recommendation.shown", "feedback.recommendation.accepted"]
MONITOR_SECONDS = 10  # stream_monitor's interval in the tests that wait for it (40 by default)
MONITOR_TICK_SECONDS = MONITOR_SECONDS + 5  # between two of its ticks: the interval, then the daemon's 5 s loop


def _features(p: Pipeline, user: str) -> dict[str, Any] | None:
    out = p.cli("features", user)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _check(p: Pipeline, asset: str, name: str) -> dict[str, Any]:
    """The latest evaluation of an asset check, read from the instance as the UI does."""
    key = dg.AssetCheckKey(dg.AssetKey.from_user_string(asset), name)
    with p.instance() as inst:
        rec = inst.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
        if rec is None or rec.event is None or rec.event.dagster_event is None:
            return {}
        ev = rec.event.dagster_event.event_specific_data
        if not isinstance(ev, dg.AssetCheckEvaluation):
            return {}
        return {"passed": ev.passed, "severity": ev.severity, "description": ev.description, "metadata": ev.metadata}


def _latest_run_id(p: Pipeline, asset: str) -> str | None:
    with p.instance() as inst:
        event = inst.get_latest_materialization_event(dg.AssetKey.from_user_string(asset))
    return event.run_id if event else None


def _latest_materialization(p: Pipeline, asset: str) -> dict[str, Any]:
    with p.instance() as inst:
        event = inst.get_latest_materialization_event(dg.AssetKey.from_user_string(asset))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_event_to_feature_row_poison_checks_and_health(make_pipeline: Any) -> None:
    """publish → run succeeds → row bumped → acked (lag 0), the run log names the event; the UI's
    figures and checks are there; poison is dead-lettered with its reason while its batch-mates are
    stored and turns the dead-letter check red; a hand-corrupted row turns the consistency check red.
    Meanwhile a snapshot backfill requested through the daemon completes, without failing an ingest run."""
    today = datetime.now(UTC).date()
    p = make_pipeline(
        {
            "FEATURE_PIPELINE_DEAD_LETTERS_HOUR_WARN": "1",
            "FEATURE_PIPELINE_SNAPSHOT_START": (today - timedelta(days=30)).isoformat(),
            "FEATURE_PIPELINE_CONSISTENCY_EVERY_SECONDS": "0",  # the next run compares, so it sees the damage
            "FEATURE_PIPELINE_MONITOR_INTERVAL_SECONDS": str(MONITOR_SECONDS),
        },
        webserver=True,
    )
    # A backfill of a few days of (feedback) history runs while the rest of this test keeps ingest busy.
    backfill_id, days = _request_snapshot_backfill(p)
    run(publish(p.nats.url, [synced("evt-e2e-1", "u-42", total=12)]))
    row = wait_for(lambda: _features(p, "u-42"), 90, "u-42's feature row")
    assert row["signal_count_total"] == 1 and row["latest_tasks_total"] == 12
    wait_for(p.settled, 30, "the batch to be acked and unstaged")

    with p.instance() as inst:
        messages = [e.message for r in p.runs(dg.DagsterRunStatus.SUCCESS) for e in inst.all_logs(r.run_id)]
    assert any("evt-e2e-1" in m for m in messages), "the run log names the event it stored"

    run(publish(p.nats.url, [synced("evt-e2e-2", "u-42", total=20)]))
    wait_for(lambda: (_features(p, "u-42") or {}).get("signal_count_total") == 2, 60, "the row to be bumped to 2")
    assert _features(p, "u-42")["latest_tasks_total"] == 20
    wait_for(p.settled, 30, "the run to succeed and its batch to be acked")  # its checks are recorded by then

    meta = _latest_materialization(p, "user_features")
    assert 0 <= meta["publish_to_commit_p50_seconds"] <= meta["publish_to_commit_max_seconds"] < 60
    assert meta["publish_to_commit_p95_seconds"] <= meta["publish_to_commit_max_seconds"]
    assert meta["signals_seq_range"] == "2-2" and meta["events_in_batch"] == 1
    assert meta["queue_wait_seconds"] >= 0 and meta["apply_seconds"] > 0
    # The run says what it stored (tags in the run list), logs one summary line, and materializes only the
    # tables it added rows to: a signals-only batch leaves feedback_events and dead_letters alone.
    (ingest,) = [r for r in p.runs(dg.DagsterRunStatus.SUCCESS) if r.run_id == _latest_run_id(p, "user_features")]
    assert ingest.tags["feature_pipeline/events_stored"] == "1"
    assert ingest.tags["feature_pipeline/ranges"] == "SIGNALS 2-2"
    with p.instance() as inst:
        logged = [e.message for e in inst.all_logs(ingest.run_id) if e.message.startswith("stored batch")]
        assert len(logged) == 1 and "evt-e2e-2" in logged[0]
        materialized = {
            e.dagster_event.asset_key.to_user_string()
            for e in inst.all_logs(ingest.run_id)
            if e.dagster_event is not None
            and e.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
            and e.dagster_event.asset_key is not None
        }
    assert materialized == {"signal_events", "user_features"}
    assert _check(p, "user_features", "matches_recomputation")["passed"] is True
    assert _check(p, "dead_letters", "dead_letters_last_hour")["passed"] is True
    lag_check = wait_for(
        lambda: (c := _check(p, "nats/signals", "consumer_lag")) and c["passed"] and c,
        MONITOR_TICK_SECONDS + 15,
        "a passing consumer_lag evaluation",
    )
    assert lag_check["passed"] is True
    healthy = p.cli("health", "--json")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert json.loads(healthy.stdout)["status"] == "ok"

    run(
        publish(
            p.nats.url,
            [
                synced("evt-mate-1", "u-7"),
                ("signals.task.synced", b"\xff\xfe not json"),
                ("signals.task.synced", b'{"id": "evt-no-user", "type": "task.synced"}'),
                synced("evt-mate-2", "u-7"),
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
    assert health.returncode == 1, health.stdout + health.stderr  # degraded: the dead-letter check warns
    report = json.loads(health.stdout)
    assert report["problems"] == [
        "check dead_letters:dead_letters_last_hour failed (WARN): 2 dead letters in the last hour "
        "(warn above 1, error above 1000)"
    ]
    signals = next(s for s in report["streams"] if s["stream"] == "SIGNALS")
    assert signals["consumer_lag"] == 0 and signals["last_message_at"] is not None
    assert signals["seconds_since_last_message"] > 0
    assert signals["dead_letters"] == 2
    assert report["last_ingest_run"]["status"] == "SUCCESS"

    def latest_observation() -> Any:
        with p.instance() as inst:
            records = inst.fetch_observations(dg.AssetKey(["nats", "signals"]), limit=1).records
        return records[0].asset_observation.metadata if records else None

    # An observation made after the poison was dead-lettered: the monitor's first one (its tick when the
    # daemon started, before anything was published) also reads lag 0.
    meta = wait_for(
        lambda: (
            (m := latest_observation())
            and m["consumer_lag_messages"].value == 0
            and m.get("dead_lettered_messages") is not None
            and m["dead_lettered_messages"].value == 2
            and m
        ),
        MONITOR_TICK_SECONDS + 15,
        "stream_monitor to observe the drained stream and its two dead letters",
    )
    assert "last_message_at" in meta
    for field in ("oldest_unacked_age_seconds", "redelivered_messages", "in_flight_messages", "dead_lettered_messages"):
        assert field in meta, field

    dl_check = _check(p, "dead_letters", "dead_letters_last_hour")
    assert dl_check["passed"] is False and dl_check["severity"] == dg.AssetCheckSeverity.WARN
    assert "2 dead letters in the last hour" in dl_check["description"]
    assert "not valid JSON" in _latest_materialization(p, "dead_letters")["by_reason"]

    store = FeatureStore(p.db)
    con = store.connect()  # waits while a run holds the file
    try:
        con.execute("UPDATE user_features SET signal_count_total = 999 WHERE user_id = 'u-42'")
    finally:
        con.close()
    run(publish(p.nats.url, [synced("evt-after-corruption", "u-8")]))
    wait_for(lambda: _features(p, "u-8"), 60, "u-8's row")
    consistency = wait_for(
        lambda: (c := _check(p, "user_features", "matches_recomputation")) and c["passed"] is False and c,
        30,
        "the consistency check to fail",
    )
    assert consistency["severity"] == dg.AssetCheckSeverity.ERROR
    assert "u-42" in consistency["description"] and "u-8" not in consistency["description"]

    _assert_snapshot_backfill(p, backfill_id, days)
    degraded = p.cli("health", "--json")
    assert degraded.returncode == 1, degraded.stdout + degraded.stderr
    problems = " ".join(json.loads(degraded.stdout)["problems"])
    assert "user_features:matches_recomputation failed" in problems


def test_slow_commits_and_a_stopped_ingest_sensor_are_named(make_pipeline: Any) -> None:
    """A slow commit turns commit_latency red. Stop ingest_sensor: within two stream_monitor ticks
    ingest_running fails naming it, stream_monitor keeps grading lag (red as messages pile up), the
    freshness daemon marks user_features stale, and health exits 1 saying the sensor is stopped."""
    p = make_pipeline(
        {
            "FEATURE_PIPELINE_FAULTS": "slow-commit",
            "FEATURE_PIPELINE_COMMIT_LATENCY_WARN_SECONDS": "2",
            "FEATURE_PIPELINE_COMMIT_LATENCY_ERROR_SECONDS": "5",
            "FEATURE_PIPELINE_LAG_WARN": "0",
            "FEATURE_PIPELINE_LAG_ERROR": "5",
            "FEATURE_PIPELINE_FRESHNESS_WARN_SECONDS": "60",
            "FEATURE_PIPELINE_FRESHNESS_FAIL_SECONDS": "61",
            "FRESHNESS_DAEMON_INTERVAL_SECONDS": "5",
            "FEATURE_PIPELINE_MONITOR_INTERVAL_SECONDS": str(MONITOR_SECONDS),
        }
    )
    run(publish(p.nats.url, [synced("evt-before-stop", "u-1")]))
    wait_for(lambda: _features(p, "u-1"), 90, "u-1's row")
    # The row is visible at COMMIT; the run records its checks a moment later.
    latency = wait_for(lambda: _check(p, "user_features", "commit_latency"), 30, "the run's commit_latency check")
    assert latency["passed"] is False and latency["severity"] == dg.AssetCheckSeverity.ERROR, latency
    assert "warn above 2 s, error above 5 s" in latency["description"]
    assert latency["metadata"]["worst_p95_seconds"].value >= 10  # the fault waits 10 s before COMMIT
    wait_for(p.settled, 30, "caught up")
    wait_for(lambda: _check(p, "nats/signals", "ingest_running").get("passed") is True, 75, "ingest_running")
    stop = subprocess.run(
        [str(BIN / "dagster"), "sensor", "stop", "ingest_sensor", "-w", str(REPO / "workspace.yaml")],
        env=p.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    stopped = wait_for(
        lambda: (c := _check(p, "nats/signals", "ingest_running")) and c["passed"] is False and c,
        2 * MONITOR_TICK_SECONDS + 15,
        "stream_monitor to fail ingest_running",
    )
    assert stopped["severity"] == dg.AssetCheckSeverity.ERROR
    assert stopped["description"].startswith("ingest_sensor is STOPPED since 20"), stopped
    run(publish(p.nats.url, [synced(f"evt-piling-{i}", "u-1") for i in range(10)]))
    lag = wait_for(
        lambda: (c := _check(p, "nats/signals", "consumer_lag")) and c["passed"] is False and c,
        75,
        "stream_monitor to fail consumer_lag",
    )
    assert lag["severity"] == dg.AssetCheckSeverity.ERROR and "10 messages not yet acked" in lag["description"]

    def freshness() -> str | None:
        with p.instance() as inst:
            rec = inst.get_freshness_state_records([dg.AssetKey("user_features")]).get(dg.AssetKey("user_features"))
        return rec.freshness_state.value if rec else None

    wait_for(lambda: freshness() == "FAIL", 120, "user_features freshness FAIL")
    health = p.cli("health", "--json")
    assert health.returncode == 1, health.stdout + health.stderr
    report = json.loads(health.stdout)
    assert report["freshness"]["user_features"] == "FAIL"
    # health reads the streams itself: the monitor's evaluation, when older than that live read, is superseded
    # by it (graded alike); one the monitor made after the read (a tick can land in between) still counts.
    lag_check = report["checks"]["nats/signals:consumer_lag"]
    older = datetime.fromisoformat(lag_check["at"]) < datetime.fromisoformat(report["streams_read_at"])
    assert lag_check["state"] == ("superseded" if older else "failed"), (lag_check, report["streams_read_at"])
    assert any(p.startswith("SIGNALS consumer_lag (ERROR, read now): 10 messages") for p in report["problems"]), report
    assert any(problem.startswith("ingest_sensor is STOPPED since") for problem in report["problems"]), report


def test_nats_killed_while_a_batch_is_staged_loses_and_doubles_nothing(make_pipeline: Any) -> None:
    """SIGKILL nats-server as soon as a batch is staged; its run stores the batch but cannot write the online
    store, so it fails outside its messages (the batch stays staged, no delivery is spent) and settle waits for
    NATS; restart it on the same store and publish more: every event is stored exactly once, the online store
    equals the store, and nothing is dead-lettered."""
    p = make_pipeline()
    users = [f"u-{i}" for i in range(20)]
    first = run(
        publish_events(p.nats.url, subjects=SIGNAL_SUBJECTS + FEEDBACK_SUBJECTS, users=users, count=300, rate=None)
    )
    wait_for(p.staged, 60, "a staged batch", interval=0.05)
    p.nats.kill()
    ended = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
    wait_for(lambda: p.runs(*ended), 60, "the run to end without NATS")
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
    assert p.query("SELECT count(*) FROM dead_letters") == [(0,)], "a failure outside the messages spends nothing"
    assert {u: (_features(p, u) or {}).get("signal_count_total") for u in totals} == totals, "the online store too"


def test_failing_runs_redeliver_then_dead_letter_and_recover(make_pipeline: Any) -> None:
    """Every run fails (injected): the message is redelivered NATS_MAX_DELIVER=3 times, then
    dead-lettered with the run's error; once runs work again the dead letter lands in the table."""
    p = make_pipeline({"FEATURE_PIPELINE_FAULTS": "fail-run", "NATS_MAX_DELIVER": "3"})
    run(publish(p.nats.url, [synced("evt-doomed", "u-9")]))
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


def test_a_store_outage_longer_than_the_retry_budget_dead_letters_nothing(make_pipeline: Any, tmp_path: Path) -> None:
    """The DuckDB folder cannot be created (its parent is a file) for longer than NATS_MAX_DELIVER=2 runs:
    every run fails outside its messages, so the batch stays staged and is retried, nothing is NAKed or
    dead-lettered, the sensor fetches nothing new, and `health` says why. Fixed, every event is stored once."""
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    p = make_pipeline({"FEATURE_STORE_PATH": str(blocked / "store.duckdb"), "NATS_MAX_DELIVER": "2"})
    p.db = blocked / "store.duckdb"
    published = run(publish_events(p.nats.url, subjects=SIGNAL_SUBJECTS, users=["u-1", "u-2"], count=20, rate=None))

    def failed_batch_runs() -> list[dg.DagsterRun]:  # not the window-refresh schedule's runs, which fail too
        return [r for r in p.runs(dg.DagsterRunStatus.FAILURE) if "feature_pipeline/batch_id" in r.tags]

    failed = wait_for(lambda: len(runs := failed_batch_runs()) >= 3 and runs, 120, "three failed runs of the batch")
    assert len({r.tags["feature_pipeline/batch_id"] for r in failed}) == 1, "the same batch, retried"
    assert {r.tags.get("feature_pipeline/attempt", "0") for r in failed} >= {"0", "1", "2"}
    health = wait_for(lambda: (h := p.cli("health", "--json")).returncode == 1 and "retrying" in h.stdout and h,
                      30, "health to name the retried batch")  # fmt: skip
    problems = " ".join(json.loads(health.stdout)["problems"])
    assert str(blocked) in problems and "not fetching" in problems
    run(publish(p.nats.url, [synced("evt-during-outage", "u-3")]))
    time.sleep(3)
    assert p.lag()["SIGNALS"] == len(published) + 1, "nothing acked, the new event not fetched"
    assert not run(stream_messages(p.nats.url, "DEADLETTER")), "an outage dead-letters nothing"

    blocked.unlink()  # the store comes back
    everything = sorted([*published, "evt-during-outage"])
    wait_for(lambda: sorted(p.stored_ids()) == everything and p.settled(), 120, "every event stored once")
    assert p.query("SELECT count(*) FROM dead_letters") == [(0,)]
    assert p.query("SELECT sum(signal_count_total) FROM user_features") == [(len(everything),)]
    recovered = wait_for(lambda: (h := p.cli("health", "--json")).returncode == 0 and h, 30, "health ok again")
    assert json.loads(recovered.stdout)["retrying"] == []


def _worker_pid(p: Pipeline, run_id: str) -> int | None:
    """The live run worker of a run: from the engine event the launcher writes ("Started process for run
    (pid: N)"), or on the warm worker its pool process (one run at a time; the engine events name no pid)."""
    if p.warm:
        children = [c for w in p.workers for c in pool_children(w.pid)]
        return children[0] if children else None
    with p.instance() as inst:
        for entry in inst.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            m = re.search(r"Started process for run \(pid: (\d+)\)", entry.message)
            if m and Path(f"/proc/{m.group(1)}").exists():
                return int(m.group(1))
    return None


def test_killed_run_worker_and_killed_daemon_lose_and_double_nothing(make_pipeline: Any) -> None:
    """SIGKILL the run worker inside its DuckDB transaction: the file opens clean with no partial batch,
    run monitoring fails the run (dagster/max_runtime), the batch is redelivered and stored once. Then
    SIGKILL the whole daemon (code server, run worker) with a batch in flight and restart it: the staged
    batch is found again and settled, and no staged file is left behind."""
    p = make_pipeline({"FEATURE_PIPELINE_FAULTS": "slow-commit", "FEATURE_PIPELINE_RUN_TIMEOUT_SECONDS": "15"})
    published = run(publish_events(p.nats.url, subjects=SIGNAL_SUBJECTS, users=["u-1", "u-2"], count=50, rate=None))

    def started_run() -> dg.DagsterRun | None:
        runs = p.runs(dg.DagsterRunStatus.STARTED)
        return runs[0] if runs and _worker_pid(p, runs[0].run_id) else None

    first = wait_for(started_run, 90, "a started ingest run")
    time.sleep(4)  # inside the transaction: slow-commit holds it open for 10 s before COMMIT
    os.kill(_worker_pid(p, first.run_id) or 0, signal.SIGKILL)
    assert p.query("SELECT count(*) FROM signal_events") in ([], [(0,)]), "a partial batch is visible"
    wait_for(lambda: p.run_status(first.run_id) == dg.DagsterRunStatus.FAILURE, 60,
             "run monitoring to fail the killed run")  # fmt: skip

    second = wait_for(lambda: (r := started_run()) and r.run_id != first.run_id and r, 90, "the redelivery's run")
    assert p.staged(), "the batch is in flight"
    if p.warm:  # the run is not the daemon's child there: kill it with the daemon
        os.kill(_worker_pid(p, second.run_id) or 0, signal.SIGKILL)
    os.killpg(p.daemon.pid, signal.SIGKILL)
    p.daemon.wait(10)
    time.sleep(3)
    p.start_daemon()
    wait_for(lambda: sorted(p.stored_ids()) == sorted(published) and p.settled(), 180, "every event stored once")

    assert sorted(p.stored_ids()) == sorted(published)
    assert p.query("SELECT sum(signal_count_total) FROM user_features") == [(len(published),)]
    assert p.run_status(second.run_id) == dg.DagsterRunStatus.FAILURE
    assert not p.staged()


def _request_snapshot_backfill(p: Pipeline) -> tuple[str, list[date]]:
    """Store a few days of history, then ask the daemon for a backfill of those days' snapshots with
    `feature-pipeline backfill-snapshots`, which creates the same asset backfill as the UI's Materialize."""
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=k) for k in (4, 3, 2)]

    def noon(day: date) -> datetime:
        return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)

    history = [_shown(f"a-{d}", "alice", noon(d)) for d in days]  # one a day
    history += [_shown("b-last", "bob", noon(days[-1])), _shown("b-after", "bob", noon(today))]
    stored = len(p.stored_ids())
    run(publish(p.nats.url, history))
    wait_for(lambda: len(p.stored_ids()) == stored + len(history), 90, "the history to be stored")
    wait_for(lambda: port_open("127.0.0.1", p.webserver_port or 0), 60, "the webserver to listen")
    out = p.cli("backfill-snapshots", days[0].isoformat(), days[-1].isoformat(), "--webserver", p.webserver_url)
    assert out.returncode == 0, out.stderr
    assert f"through the webserver at {p.webserver_url}" in out.stdout, "the public GraphQL path was not taken"
    return out.stdout.split()[1].rstrip(":"), days


def _assert_snapshot_backfill(p: Pipeline, backfill_id: str, days: list[date]) -> None:
    """The backfill built exactly the requested days from the raw tables, and no ingest run failed meanwhile."""

    def done() -> bool:
        with p.instance() as inst:
            backfill = inst.get_backfill(backfill_id)
        assert backfill is not None
        assert backfill.status.value not in ("FAILED", "CANCELED"), backfill
        return backfill.status.value == "COMPLETED_SUCCESS"

    wait_for(done, 150, "the snapshot backfill to complete")
    assert not p.runs(dg.DagsterRunStatus.FAILURE), "a backfill must not make an ingest run fail"
    rows = p.query(
        "SELECT snapshot_date, user_id, rec_shown_7d, last_feedback_at, as_of FROM user_feature_snapshots "
        "WHERE user_id IN ('alice', 'bob') ORDER BY 1, 2"
    )
    noon = [datetime(d.year, d.month, d.day, 12, tzinfo=UTC) for d in days]
    expected = [
        (days[0], "alice", 1, noon[0]),
        (days[1], "alice", 2, noon[1]),
        (days[2], "alice", 3, noon[2]),
        (days[2], "bob", 1, noon[2]),  # bob's event of today is after each snapshot's day
    ]
    assert [r[:4] for r in rows] == expected
    assert all(r[4] == day_end(r[0]) for r in rows)
    with p.instance() as inst:
        assert inst.get_materialized_partitions(dg.AssetKey("user_feature_snapshots")) == {d.isoformat() for d in days}


def _shown(event_id: str, user: str, when: datetime) -> tuple[str, bytes]:
    data = {"recommendation_id": "r-1", "item_id": "i-1"}
    return "feedback.recommendation.shown", make_envelope(event_id, "recommendation.shown", user, when, data)
