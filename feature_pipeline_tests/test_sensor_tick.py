"""The sensor tick and the ingest asset, in-process, against a real nats-server and DuckDB file.

Each test drives ticks by hand with a Dagster test instance, so every settle path (ack,
delayed NAK, dead letter after the last delivery, keep-alive, NATS down) is exercised
deterministically; test_e2e.py covers the same promises through the real daemon.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import pytest

from feature_pipeline.broker import Broker
from feature_pipeline.defs import sensors
from feature_pipeline.defs.assets import BATCH_TAG, ingest_batch
from feature_pipeline.defs.resources import NatsResource
from feature_pipeline.defs.sensors import run_tick
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.localnats import LocalNats
from feature_pipeline.testing import consumer_states, query, run, stream_messages

R = TypeVar("R", bound=dg.ConfigurableResource)


async def _publish(url: str, items: list[tuple[str, bytes]]) -> None:
    async with await Broker.connect(url) as broker:
        await broker.ensure_streams()
        for subject, body in items:
            await broker.js.publish(subject, body)


def _synced(event_id: str, user: str = "u-1", total: int = 5) -> tuple[str, bytes]:
    body = make_envelope(
        event_id,
        "task.synced",
        user,
        datetime.now(UTC),
        {"provider": "todoist", "tasks_total": total, "tasks_completed": 1},
    )
    return "signals.task.synced", body


def _tick(instance: dg.DagsterInstance, res: dict[str, Any]) -> tuple[list[dg.RunRequest], Any]:
    return run_tick(instance, res["nats"], res["ingest"])


def _tick_until_request(
    instance: dg.DagsterInstance, res: dict[str, Any], timeout: float = 15
) -> tuple[list[dg.RunRequest], Any]:
    """Tick until a batch is staged (redeliveries come back after their NAK delay)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        requests, report = _tick(instance, res)
        if requests:
            return requests, report
        time.sleep(0.3)
    raise AssertionError(f"no batch staged within {timeout} s")


def replace(resource: R, **changes: Any) -> R:
    """A copy of a resource with some fields changed (model_copy would keep Dagster's cached config)."""
    fields = {name: getattr(resource, name) for name in type(resource).model_fields}
    return type(resource)(**{**fields, **changes})


def _execute(instance: dg.DagsterInstance, res: dict[str, Any], req: dg.RunRequest, fail: bool = False) -> bool:
    """What the daemon would launch for a run request: the ingest asset with the batch tag."""
    resources = dict(res)
    if fail:
        resources["ingest"] = replace(res["ingest"], faults="fail-run")
    result = dg.materialize([ingest_batch], instance=instance, resources=resources, tags=req.tags, raise_on_error=False)
    return result.success


def _lag(res: dict[str, Any]) -> dict[str, int]:
    infos = run(consumer_states(res["nats"].url, res["nats"].durable_prefix))
    return {k: v.num_pending + v.num_ack_pending for k, v in infos.items()}


def _caught_up(
    res: dict[str, Any], streams: tuple[str, ...] = ("SIGNALS", "FEEDBACK", "DEADLETTER"), timeout: float = 10.0
) -> bool:
    """Every consumer at lag 0. JetStream applies acks asynchronously after the flush that delivered
    them, so give it a moment (on a busy machine it can take one) instead of reading once."""
    deadline = time.monotonic() + timeout
    while any(lag for name, lag in _lag(res).items() if name in streams):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_success_acks_only_after_the_run(resources: dict[str, Any], tmp_path: Path) -> None:
    """Messages stay unacked while the run is pending and are acked on the tick after it succeeded."""
    url = resources["nats"].url
    run(_publish(url, [_synced("evt-a"), _synced("evt-b", "u-2")]))
    with dg.instance_for_test() as inst:
        (req,), report = _tick(inst, resources)
        assert req.tags[BATCH_TAG] == req.run_key
        assert report.fetched == {"SIGNALS": 2}
        assert _lag(resources)["SIGNALS"] == 2, "nothing may be acked before the run has run"

        requests, report = _tick(inst, resources)  # run not there yet: asked again
        assert [r.run_key for r in requests] == [req.run_key]
        assert report.kept_alive == 0, "+WPI is due only once ack_wait/4 has passed (see the keep-alive test)"

        assert _execute(inst, resources, req)
        assert _lag(resources)["SIGNALS"] == 2, "a succeeded run alone acks nothing; the sensor settles"
        requests, report = _tick(inst, resources)
        assert requests == []
        assert report.acked == 2 and report.settled_batches == 1
    assert _caught_up(resources)
    assert not list((tmp_path / "staging").iterdir()), "a settled batch leaves no staged files"
    rows = query(tmp_path / "store.duckdb", "SELECT user_id, signal_count_total FROM user_features ORDER BY 1")
    assert rows == [("u-1", 1), ("u-2", 1)]


def test_failed_run_naks_with_delay_then_dead_letters_on_last_delivery(
    resources: dict[str, Any], tmp_path: Path
) -> None:
    """max_deliver=3: two failed runs NAK (1 s, then 2 s delay), the third dead-letters with the run's error."""
    url = resources["nats"].url
    run(_publish(url, [_synced("evt-fail")]))
    with dg.instance_for_test() as inst:
        for attempt in range(1, 4):
            (req,), report = _tick_until_request(inst, resources)
            assert report.fetched == {"SIGNALS": 1}
            assert not _execute(inst, resources, req, fail=True)
            _, report = _tick(inst, resources)
            if attempt < 3:
                assert (report.nacked, report.dead_lettered) == (1, 0)
            else:
                assert (report.nacked, report.dead_lettered) == (0, 1)
    dead = run(stream_messages(url, "DEADLETTER"))
    assert len(dead) == 1
    msg = dead[0]
    assert msg.subject == "deadletter.signals.task.synced"
    assert msg.headers["FP-Delivery-Count"] == "3"
    assert msg.headers["FP-Original-Stream"] == "SIGNALS"
    assert "gave up after 3 deliveries" in msg.headers["FP-Reason"]
    assert "fail-run" in msg.headers["FP-Reason"], "the reason carries the run's own error"
    assert b'"id":"evt-fail"' in msg.data, "the dead letter keeps the original body"
    assert _caught_up(resources, ("SIGNALS",)), "the original is TERMed"
    assert query(tmp_path / "store.duckdb", "SELECT count(*) FROM signal_events") == [(0,)]


def test_redelivery_waits_for_the_nak_delay(resources: dict[str, Any]) -> None:
    """A NAK after a failed run carries a delay: the message is not back at once."""
    run(_publish(resources["nats"].url, [_synced("evt-delay")]))
    resources["ingest"] = replace(resources["ingest"], nak_delay_seconds=3)
    with dg.instance_for_test() as inst:
        (req,), _ = _tick(inst, resources)
        assert not _execute(inst, resources, req, fail=True)
        _, report = _tick(inst, resources)
        assert report.nacked == 1
        naked_at = time.monotonic()
        requests, report = _tick(inst, resources)
        assert requests == [] and not report.fetched, "redelivered before the NAK delay"
        _tick_until_request(inst, resources, timeout=10)
        assert time.monotonic() - naked_at >= 2.5


def test_poison_is_dead_lettered_at_once_and_batch_mates_are_stored(resources: dict[str, Any], tmp_path: Path) -> None:
    url = resources["nats"].url
    bad_type = make_envelope("evt-wrong", "task.completed", "u-1", datetime.now(UTC), {"task_id": "t"})
    run(_publish(url, [_synced("evt-ok1"), ("signals.task.synced", b"{not json"), ("signals.task.synced", bad_type)]))
    run(_publish(url, [_synced("evt-ok2")]))
    with dg.instance_for_test() as inst:
        (req,), report = _tick(inst, resources)
        assert report.poison == 2
        assert _execute(inst, resources, req)
        # This tick settles the batch and fetches the two dead letters from DEADLETTER into a new one.
        (req2,), report = _tick(inst, resources)
        assert report.fetched == {"DEADLETTER": 2}
        assert _execute(inst, resources, req2)
        _tick(inst, resources)
    assert query(tmp_path / "store.duckdb", "SELECT event_id FROM signal_events ORDER BY 1") == [
        ("evt-ok1",),
        ("evt-ok2",),
    ]
    reasons = dict(query(tmp_path / "store.duckdb", "SELECT original_seq, reason FROM dead_letters"))
    assert sorted(reasons) == [2, 3]
    assert reasons[2].startswith("not valid JSON")
    assert "does not match subject 'signals.task.synced'" in reasons[3]
    assert _caught_up(resources)


def test_keep_alive_stops_ack_wait_redelivery(
    tmp_path: Path, nats_server: LocalNats, resources: dict[str, Any]
) -> None:
    """ack_wait=10 s, run pending for 14 s, ticks every 3 s: the batch is never redelivered."""
    resources["nats"] = NatsResource(url=nats_server.url, durable_prefix="ka", max_deliver=3, ack_wait_seconds=10)
    run(_publish(nats_server.url, [_synced("evt-slow")]))
    with dg.instance_for_test() as inst:
        (req,), _ = _tick(inst, resources)
        start = time.monotonic()
        while time.monotonic() - start < 14:
            time.sleep(3)
            _, report = _tick(inst, resources)
            assert report.kept_alive == 1
            assert not report.fetched, "the pending message was redelivered despite +WPI"
        assert _execute(inst, resources, req)
        _, report = _tick(inst, resources)
        assert report.acked == 1
    info = run(consumer_states(nats_server.url, "ka"))["SIGNALS"]
    assert info.num_redelivered == 0 and info.num_ack_pending == 0


def test_nats_down_keeps_batches_in_flight_and_settles_after_restart(
    resources: dict[str, Any], nats_server: LocalNats, tmp_path: Path
) -> None:
    """Settle cannot reach NATS: the batch stays staged, the tick says why, and a later tick acks it.

    Acks sent while a SIGKILLed server is still recovering its consumer can be dropped without an
    error; then ack_wait (5 s here) redelivers the batch and the event ids absorb it. Either way the
    end state must be: both events stored once, nothing pending."""
    resources["nats"] = replace(resources["nats"], ack_wait_seconds=5)
    run(_publish(nats_server.url, [_synced("evt-x"), _synced("evt-y")]))
    with dg.instance_for_test() as inst:
        (req,), _ = _tick(inst, resources)
        nats_server.kill()
        assert _execute(inst, resources, req), "the run needs no NATS"
        requests, report = _tick(inst, resources)
        assert report.problem and f"cannot reach NATS at {nats_server.url}" in report.problem
        assert report.in_flight == 1 and requests == []
        assert len(list((tmp_path / "staging").iterdir())) == 1
        nats_server.start()
        acked, deadline = 0, time.monotonic() + 40
        while time.monotonic() < deadline:
            requests, report = _tick(inst, resources)
            acked += report.acked
            for again in requests:  # a redelivered copy, if the first acks were lost
                assert _execute(inst, resources, again)
            if acked >= 2 and not report.in_flight and _caught_up(resources, ("SIGNALS",), timeout=1):
                break
            time.sleep(0.3)
        assert acked >= 2, "the staged batch was never acked after NATS came back"
    assert _caught_up(resources, ("SIGNALS",))
    assert query(tmp_path / "store.duckdb", "SELECT event_id FROM signal_events ORDER BY 1") == [("evt-x",), ("evt-y",)]
    assert query(tmp_path / "store.duckdb", "SELECT signal_count_total FROM user_features") == [(2,)]


def test_orphan_batch_gets_its_run_requested_again(resources: dict[str, Any]) -> None:
    """A batch staged by a tick whose run request was lost (daemon died) is requested again, same run_key."""
    run(_publish(resources["nats"].url, [_synced("evt-o")]))
    with dg.instance_for_test() as inst:
        (req,), _ = _tick(inst, resources)
        (again,), _ = _tick(inst, resources)
        assert again.run_key == req.run_key


def test_window_refresh_run_observes_user_features_and_materializes_nothing(
    resources: dict[str, Any], tmp_path: Path
) -> None:
    """The schedule's run moves the clock (rows whose windows moved) and republishes the serving copy, but
    records an observation: user_features' freshness keeps saying whether ingest itself is alive."""
    from feature_pipeline.defs.assets import REFRESH_TAG, ingest_job
    from feature_pipeline.defs.schedules import refresh_feature_windows

    url = resources["nats"].url
    run(_publish(url, [_synced("evt-r", "u-r")]))
    job = dg.Definitions(assets=[ingest_batch], jobs=[ingest_job], resources=resources).resolve_job_def("ingest")
    with dg.instance_for_test() as inst:
        (req,), _ = _tick(inst, resources)
        assert job.execute_in_process(instance=inst, tags=req.tags).success  # as the daemon runs it: job "ingest"
        _tick(inst, resources)

        ctx = dg.build_schedule_context(instance=inst, resources=resources, scheduled_execution_time=datetime.now(UTC))
        skipped = refresh_feature_windows(ctx)
        assert isinstance(skipped, dg.SkipReason) and "less than a refresh period ago" in str(skipped.skip_message)
        later = dg.build_schedule_context(
            instance=inst, resources=resources, scheduled_execution_time=datetime.now(UTC) + timedelta(minutes=10)
        )
        request = refresh_feature_windows(later)
        assert isinstance(request, dg.RunRequest) and request.tags[REFRESH_TAG] == "windows"

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
        assert sorted((c.asset_key.to_user_string(), c.passed) for c in checks) == [
            ("dead_letters", True),
            ("user_features", True),
        ]


def test_batch_staged_from_several_pulls_is_settled_as_one(
    resources: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch grows over several pulls (FETCH_CHUNK) into one run: a failed run NAKs every message
    of it, from every pull; the redelivered batch's successful run acks them all, stored once."""
    monkeypatch.setattr(sensors, "FETCH_CHUNK", 2)
    url = resources["nats"].url
    run(_publish(url, [_synced(f"evt-{i}", f"u-{i % 2}") for i in range(5)]))
    with dg.instance_for_test() as inst:
        (req,), report = _tick(inst, resources)
        assert report.fetched == {"SIGNALS": 5} and [m.size for m in report.staged] == [5]
        assert not _execute(inst, resources, req, fail=True)
        _, report = _tick(inst, resources)
        assert (report.nacked, report.acked, report.settled_batches) == (5, 0, 1)
        (req2,), report = _tick_until_request(inst, resources)
        assert report.fetched == {"SIGNALS": 5} and req2.run_key != req.run_key
        assert _execute(inst, resources, req2)
        _, report = _tick(inst, resources)
        assert (report.acked, report.nacked) == (5, 0)
    assert _caught_up(resources)
    assert query(tmp_path / "store.duckdb", "SELECT count(*) FROM signal_events") == [(5,)]
    assert query(tmp_path / "store.duckdb", "SELECT user_id, signal_count_total FROM user_features ORDER BY 1") == [
        ("u-0", 3),
        ("u-1", 2),
    ]


def test_fetch_time_ends_the_batch_and_the_tick(resources: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the tick's fetch time no further pull starts: the batch so far is staged and the rest waits."""
    monkeypatch.setattr(sensors, "FETCH_CHUNK", 2)
    resources["ingest"] = replace(resources["ingest"], fetch_seconds=1)
    run(_publish(resources["nats"].url, [_synced(f"evt-{i}") for i in range(6)]))
    real_assemble = sensors.assemble

    def slow_assemble(deliveries: Any) -> Any:
        time.sleep(0.6)  # two pulls take longer than the second of fetch time
        return real_assemble(deliveries)

    monkeypatch.setattr(sensors, "assemble", slow_assemble)
    with dg.instance_for_test() as inst:
        (_,), report = _tick(inst, resources)
        assert report.fetched == {"SIGNALS": 2}, "a pull that would end past the fetch time is not started"
        assert len(report.staged) == 1
        assert _lag(resources)["SIGNALS"] == 6, "the rest is still pending"


def test_no_new_batch_while_one_waits_for_its_run(resources: dict[str, Any]) -> None:
    """A second batch behind one whose run has not started would only add a run's start-up: the new
    messages wait in the stream and join the next batch once the run has started or ended."""
    url = resources["nats"].url
    run(_publish(url, [_synced("evt-1")]))
    with dg.instance_for_test() as inst:
        (req,), _ = _tick(inst, resources)
        run(_publish(url, [_synced("evt-2"), _synced("evt-3")]))
        requests, report = _tick(inst, resources)
        assert [r.run_key for r in requests] == [req.run_key] and not report.fetched
        assert report.holding == req.run_key and "waits for its run to start" in report.summary()
        assert _execute(inst, resources, req)
        (req2,), report = _tick(inst, resources)
        assert report.acked == 1 and report.fetched == {"SIGNALS": 2} and report.staged[0].size == 2
        assert _execute(inst, resources, req2)
        _tick(inst, resources)
    assert _caught_up(resources)
