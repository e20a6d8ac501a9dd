"""The Dagster edge, in-process: the ingest sensor's requests, runs found by their batch tag, failure
texts from the run's own events, canceled runs, the window-refresh schedule, and a run that fails on
an unwritable store. Real nats-server, real DuckDB file, Dagster test instances."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from feature_pipeline.cli.backfill import add_backfill_to_instance, partition_keys
from feature_pipeline.defs.assets import REFRESH_TAG
from feature_pipeline.defs.checks import Checks
from feature_pipeline.defs.names import Names
from feature_pipeline.defs.runs import BATCH_TAG, MAX_RUNTIME_TAG, DagsterRuns, batch_tags
from feature_pipeline.ingest.failures import Cause, RunFailure
from feature_pipeline.ingest.report import TickReport
from feature_pipeline.ingest.tick import blocked_batches
from feature_pipeline.settings import Settings
from feature_pipeline.snapshot_days import available, register
from feature_pipeline.testing import query, run, wait_for
from feature_pipeline_tests.helpers import (
    DagsterLifecycle,
    Lifecycle,
    caught_up,
    changed,
    definitions,
    lag,
    materialize,
    publish,
    redeliveries,
    resources,
    stored_ids,
    synced,
)


def test_sensor_requests_a_run_per_batch_and_acks_after_it_succeeded(settings: Settings, tmp_path: Path) -> None:
    """The sensor itself: one run request per staged batch (batch id as run key and tag, the max-runtime
    tag), the streams observed by stream_monitor; after the run succeeded, the next evaluation acks the batch."""
    run(publish(settings.nats_url, [synced("evt-a"), synced("evt-b", "u-2")]))
    defs = definitions(settings)
    sensor, stream_monitor = defs.resolve_sensor_def("ingest_sensor"), defs.resolve_sensor_def("stream_monitor")
    with dg.instance_for_test() as inst:
        with dg.build_sensor_context(instance=inst, resources=resources(settings)) as ctx:
            result = sensor.evaluate_tick(ctx)  # as the daemon evaluates it
        (req,) = result.run_requests or []
        assert req.tags[BATCH_TAG] == req.run_key
        assert req.tags[MAX_RUNTIME_TAG] == str(settings.run_timeout_seconds)
        assert not [e for e in result.asset_events if isinstance(e, dg.AssetObservation)]  # stream_monitor's job
        with dg.build_sensor_context(instance=inst, resources=resources(settings)) as ctx:
            monitored = stream_monitor.evaluate_tick(ctx)
        observed = {e.asset_key.to_user_string() for e in monitored.asset_events if isinstance(e, dg.AssetObservation)}
        assert observed == {"nats/signals", "nats/feedback", "nats/deadletter"}
        checks = [
            (e.asset_key.to_user_string(), e.check_name)
            for e in monitored.asset_events
            if isinstance(e, dg.AssetCheckEvaluation)
        ]
        names = ("consumer_lag", "oldest_unacked_age", "ingest_running")
        assert sorted(checks) == sorted((f"nats/{s}", n) for s in ("signals", "feedback", "deadletter") for n in names)
        assert lag(settings)["SIGNALS"] == 2, "nothing may be acked before the run has run"

        assert materialize(inst, settings, dict(req.tags)).success
        with dg.build_sensor_context(instance=inst, resources=resources(settings)) as ctx:
            again = sensor.evaluate_tick(ctx)
        assert not again.run_requests
        assert again.skip_message and "acked 2" in again.skip_message
    assert caught_up(settings)
    assert sorted(stored_ids(settings)) == ["evt-a", "evt-b"]


def test_a_failed_runs_own_error_becomes_the_dead_letter_reason(settings: Settings) -> None:
    """DagsterRuns finds the run by its batch tag and reads why it failed from the run's own events."""
    run(publish(settings.nats_url, [synced("evt-fail")]))
    with dg.instance_for_test() as inst:
        life = DagsterLifecycle(settings, inst)
        (batch,) = life.tick().to_request
        assert not life.execute(batch, fail=True)
        found = DagsterRuns(inst).run_for(batch)
        assert found is not None and found.status == "FAILURE"
        failure = DagsterRuns(inst).failure(found)
        assert failure.text.startswith(f"run {found.run_id} failed: ") and "fail-run" in failure.text
        assert failure.cause is Cause.MESSAGES, "the fail-run drill stands for an error the messages cause"
        assert life.tick().nacked == 1


def test_dagster_runs_bisect_a_batch_their_messages_fail(settings: Settings) -> None:
    """Through real runs of the ingest asset: the run of a batch with a breaking event fails with the cause
    `messages` in its metadata, the batch is split into halves with runs of their own, and every other
    event is stored on its first delivery."""
    broken = changed(settings, faults="fail-marked")
    run(publish(settings.nats_url, [synced("evt-1"), synced("evt-2", "u-2"), synced("fail-3"), synced("evt-4")]))
    with dg.instance_for_test() as inst:
        life = DagsterLifecycle(broken, inst)
        (batch,) = life.tick().to_request
        assert not life.execute(batch)
        found = DagsterRuns(inst).run_for(batch)
        assert found is not None and DagsterRuns(inst).failure(found).cause is Cause.MESSAGES
        report = life.tick()
        assert report.to_request == [f"{batch}-a", f"{batch}-b"] and report.nacked == 0
        life.drain(timeout=60)
    assert sorted(stored_ids(settings)) == ["evt-1", "evt-2", "evt-4"]


def test_re_executing_a_settled_batch_run_does_nothing_and_succeeds(settings: Settings) -> None:
    """ "Re-execute" on a finished ingest run's page: its batch is gone from staging. The run says what
    became of the batch and succeeds, storing and materializing nothing (health stays ok)."""
    run(publish(settings.nats_url, [synced("evt-once")]))
    with dg.instance_for_test() as inst:
        life = DagsterLifecycle(settings, inst)
        (batch,) = life.tick().to_request
        assert life.execute(batch)
        assert life.tick().acked == 1
        again = materialize(inst, settings, batch_tags(batch, settings.run_timeout_seconds))
        assert again.success
        assert not again.get_asset_materialization_events()
        logged = " ".join(e.user_message for e in inst.all_logs(again.run_id))
        assert f"nothing to do: batch {batch} is no longer staged" in logged and "was stored at" in logged
    assert stored_ids(settings) == ["evt-once"]


def test_health_judges_the_sensors_batch_runs_not_re_executions_or_refreshes() -> None:
    """`health`'s last ingest run is the sensor's latest run for a staged batch: a failed re-execution from the
    UI or a failed window refresh after it does not make ingest look broken."""
    from feature_pipeline.definitions import defs
    from feature_pipeline.report import _last_run

    job = defs.resolve_job_def("ingest")
    with dg.instance_for_test() as inst:
        ours = inst.create_run_for_job(job, tags=batch_tags("b-1", 60))
        rerun = inst.create_run_for_job(job, tags={**batch_tags("b-0", 60), "dagster/parent_run_id": "x"})
        refresh = inst.create_run_for_job(job, tags={REFRESH_TAG: "windows"})
        for other in (rerun, refresh):
            inst.report_run_canceled(other, "not ingest's concern")
        assert _last_run(inst, "ingest")["run_id"] == ours.run_id


def test_canceled_run_is_retried_without_spending_a_delivery(settings: Settings) -> None:
    """A run canceled from the UI ends CANCELED: nothing of its batch is acked or NAKed; the batch stays
    staged and a new run (attempt 1) stores it."""
    run(publish(settings.nats_url, [synced("evt-cancel")]))
    with dg.instance_for_test() as inst:
        life = DagsterLifecycle(settings, inst)
        (batch,) = life.tick().to_request
        from feature_pipeline.definitions import defs

        job = defs.resolve_job_def("ingest")
        canceled = inst.create_run_for_job(job, tags=batch_tags(batch, settings.run_timeout_seconds))
        inst.report_run_canceled(canceled, "canceled from the UI (test)")
        found = DagsterRuns(inst).run_for(batch)
        assert found is not None
        assert DagsterRuns(inst).failure(found) == RunFailure(
            f"run {canceled.run_id} was canceled", Cause.INFRASTRUCTURE
        )
        report = wait_for(lambda: _requested(life), 10, "the retry")
        assert report.nacked == 0 and report.acked == 0 and report.attempts == {batch: 1}
        assert life.execute(batch, attempt=1)
        after = DagsterRuns(inst).run_for(batch)
        assert after is not None and (after.attempt, after.status) == (1, "SUCCESS")
        assert life.tick().acked == 1
    assert stored_ids(settings) == ["evt-cancel"]
    assert redeliveries(settings) == 0


def _requested(life: DagsterLifecycle) -> TickReport | None:
    report = life.tick()
    return report if report.to_request else None


def test_unwritable_store_retries_the_batch_and_spends_no_delivery(settings: Settings, tmp_path: Path) -> None:
    """The DuckDB path cannot be created: the run fails saying so, as an infrastructure failure. The batch
    stays staged and kept alive, nothing is NAKed, no new batch is fetched, and the check says why; once the
    path is fixed the retry stores it, with every message still on its first delivery."""
    blocked = tmp_path / "blocked-db"
    blocked.write_text("not a folder")
    broken = changed(settings, feature_store_path=blocked / "store.duckdb")
    run(publish(settings.nats_url, [synced("evt-disk")]))
    with dg.instance_for_test() as inst:
        life = DagsterLifecycle(broken, inst)
        (batch,) = life.tick().to_request
        assert not life.execute(batch)
        found = DagsterRuns(inst).run_for(batch)
        assert found is not None
        failure = DagsterRuns(inst).failure(found)
        assert failure.cause is Cause.INFRASTRUCTURE and str(blocked) in failure.text
        run(publish(settings.nats_url, [synced("evt-later", "u-2")]))
        report = life.tick()
        assert report.nacked == 0 and report.acked == 0 and not report.fetched
        assert report.retrying and str(blocked) in report.retrying[0]
        assert "not fetching while a run fails outside its messages" in report.summary()
        assert blocked_batches(broken, DagsterRuns(inst)) == [f"batch {batch}: {failure.text}"]
        evaluation = Checks(Names()).runs_evaluation(report.retrying)
        assert not evaluation.passed and str(blocked) in (evaluation.description or "")

        life.settings = settings  # the store is back
        life.drain()
        assert not blocked_batches(settings, DagsterRuns(inst))
    assert sorted(stored_ids(settings)) == ["evt-disk", "evt-later"]
    assert redeliveries(settings) == 0


def test_window_refresh_run_observes_user_features_and_materializes_nothing(settings: Settings, tmp_path: Path) -> None:
    """The schedule's run moves the clock (rows whose windows moved) and writes them to the online store, but
    records an observation: user_features' freshness keeps saying whether ingest itself is alive."""
    run(publish(settings.nats_url, [synced("evt-r", "u-r")]))
    res = resources(settings)
    defs = definitions(settings)
    job, refresh_feature_windows = defs.resolve_job_def("ingest"), defs.resolve_schedule_def("refresh_feature_windows")
    with dg.instance_for_test() as inst:
        life = DagsterLifecycle(settings, inst)
        (batch,) = life.tick().to_request
        tags = batch_tags(batch, settings.run_timeout_seconds)
        assert job.execute_in_process(instance=inst, tags=tags).success  # as the daemon runs it: job "ingest"
        life.tick()

        # `with`: the context opens its own instance, which must be closed (see conftest's load-context guard).
        now = datetime.now(UTC)
        with dg.build_schedule_context(instance=inst, resources=res, scheduled_execution_time=now) as ctx:
            skipped = refresh_feature_windows.evaluate_tick(ctx)
        assert not skipped.run_requests and "less than a refresh period ago" in str(skipped.skip_message)
        later = now + timedelta(minutes=10)
        with dg.build_schedule_context(instance=inst, resources=res, scheduled_execution_time=later) as ctx:
            (request,) = refresh_feature_windows.evaluate_tick(ctx).run_requests or []
        assert request.tags[REFRESH_TAG] == "windows"

        before = inst.get_latest_materialization_event(dg.AssetKey("user_features"))
        result = job.execute_in_process(instance=inst, tags=request.tags)
        assert result.success
        assert result.get_asset_materialization_events() == []
        (obs,) = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
        assert obs.asset_key == dg.AssetKey("user_features")
        assert "valid_as_of" in obs.event_specific_data.asset_observation.metadata  # type: ignore[union-attr]
        after = inst.get_latest_materialization_event(dg.AssetKey("user_features"))
        assert before is not None and after is not None and after.run_id == before.run_id  # still the ingest run
        checks = result.get_asset_check_evaluations()
        assert sorted((c.asset_key.to_user_string(), c.check_name, c.passed) for c in checks) == [
            ("dead_letters", "dead_letters_last_hour", True),
            ("user_features", "commit_latency", True),
            ("user_features", "matches_online_store", True),
            ("user_features", "matches_recomputation", True),
        ]
        assert obs.event_specific_data.asset_observation.metadata["online_rows_written"].value >= 0  # type: ignore[union-attr]
    assert query(Path(settings.feature_store_path), "SELECT user_id FROM user_features") == [("u-r",)]


def test_a_backfill_without_a_webserver_is_the_one_the_ui_would_request(settings: Settings) -> None:
    """The fallback of `backfill-snapshots` when no webserver answers: the private call, kept in one
    function, writes an asset backfill of exactly the requested days for the daemon to run."""
    configured = changed(settings, snapshot_start="2026-03-01")
    keys = partition_keys(date(2026, 3, 1), date(2026, 3, 3), configured)
    with dg.instance_for_test() as inst:
        register(inst, "snapshot_days", available(configured))
        backfill = inst.get_backfill(add_backfill_to_instance(inst, keys, "snapshots march"))
    assert backfill is not None and backfill.status.value == "REQUESTED" and backfill.title == "snapshots march"
    assert backfill.asset_selection == [dg.AssetKey("user_feature_snapshots")]
    assert backfill.asset_backfill_data is not None
    targets = backfill.asset_backfill_data.target_subset.iterate_asset_partitions()
    assert sorted(t.partition_key for t in targets) == ["2026-03-01", "2026-03-02", "2026-03-03"]


def test_a_backfill_range_outside_the_partitions_is_refused(settings: Settings) -> None:
    configured = changed(settings, snapshot_start="2026-03-01")
    with pytest.raises(ValueError, match=r"2020-01-01 is before the first snapshot day, 2026-03-01 \(FEATURE_PIPE"):
        partition_keys(date(2020, 1, 1), date(2020, 1, 2), configured)


def test_old_ingest_runs_are_pruned_failed_ones_later_other_jobs_never() -> None:
    """prune_ingest_runs: succeeded ingest runs past the retention go; failed ones stay four times as long
    (they explain dead letters); runs of other jobs stay."""
    from feature_pipeline.definitions import defs
    from feature_pipeline.defs.retention import prune

    ingest, snapshots = defs.resolve_job_def("ingest"), defs.resolve_job_def("snapshot_job")
    with dg.instance_for_test() as inst:
        done = [inst.create_run_for_job(ingest, status=dg.DagsterRunStatus.SUCCESS).run_id for _ in range(3)]
        failed = inst.create_run_for_job(ingest, status=dg.DagsterRunStatus.FAILURE).run_id
        running = inst.create_run_for_job(ingest, status=dg.DagsterRunStatus.STARTED).run_id
        other = inst.create_run_for_job(snapshots, status=dg.DagsterRunStatus.SUCCESS).run_id
        now = datetime.now(UTC)
        assert prune(inst, 7, now + timedelta(days=6)) == {"succeeded": 0, "failed": 0}
        assert prune(inst, 7, now + timedelta(days=8)) == {"succeeded": 3, "failed": 0}
        assert prune(inst, 7, now + timedelta(days=29)) == {"succeeded": 0, "failed": 1}
        left = {r.dagster_run.run_id for r in inst.get_run_records()}
    assert left == {running, other} and not left & {*done, failed}


def test_the_stream_checks_run_on_their_own_from_a_job(settings: Settings, lifecycle: Lifecycle) -> None:
    """The UI cannot execute a check of an external asset from its page; the check-only job check_streams
    grades every stream check against the real server, with nothing materialized."""
    run(publish(settings.nats_url, [synced("evt-pending")]))
    lifecycle.tick()  # creates the consumers and stages the message: unacked until a run stores it
    job = definitions(settings).resolve_job_def("check_streams")
    with dg.instance_for_test() as inst:
        result = job.execute_in_process(instance=inst)
    assert result.success and result.get_asset_materialization_events() == []
    graded = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    assert len(graded) == 6
    lag_check = graded[("nats/signals", "consumer_lag")]
    assert lag_check.metadata["consumer_lag_messages"].value == 1


def test_the_sensor_says_how_often_it_really_ticks(settings: Settings) -> None:
    """The UI shows the minimum interval as "Frequency"; under the daemon's 5 s loop the description says 5 s."""
    fast = definitions(settings).resolve_sensor_def("ingest_sensor").description or ""
    assert "Ticks every 5 s, the daemon's sensor loop" in fast
    slow = definitions(changed(settings, sensor_interval_seconds=30)).resolve_sensor_def("ingest_sensor")
    assert "Ticks at least 30 s after the previous tick ended" in (slow.description or "")
