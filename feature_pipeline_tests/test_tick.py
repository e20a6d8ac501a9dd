"""The batch lifecycle (`ingest.tick`), driven by hand against a real nats-server and DuckDB file.

No Dagster here: the tick finds runs through an in-memory run lookup, and a "run" stores its batch
the way the ingest asset does. So every settle path (ack, delayed NAK, dead letter after the last
delivery, keep-alive, NATS down) is exercised deterministically, on nats-py's fast path and on its
public API; test_sensor.py covers the Dagster edge and test_e2e.py the same promises through the
real daemon.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from feature_pipeline import streams
from feature_pipeline.broker import topology
from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.broker.local import LocalNats
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.ingest.tick import TickOptions
from feature_pipeline.settings import Settings
from feature_pipeline.streams import PACKAGED
from feature_pipeline.testing import consumer_states, query, run, stream_messages
from feature_pipeline_tests.helpers import (
    Lifecycle,
    caught_up,
    changed,
    lag,
    publish,
    redeliveries,
    stored_ids,
    synced,
    unchecked,
)


@pytest.fixture(params=["fast path, folder", "public API, folder", "fast path, nats"])
def either_path(request: pytest.FixtureRequest, settings: Settings) -> Lifecycle:
    """The lifecycle on nats-py's fast path and on its public API, and with batches staged in a folder or
    in NATS: the same results every way."""
    path, staging = request.param.split(", ")
    return Lifecycle(changed(settings, staging=staging), options=TickOptions(fast_path=path == "fast path"))


@pytest.fixture(params=["folder", "nats"])
def lifecycle(request: pytest.FixtureRequest, settings: Settings) -> Lifecycle:
    """Batches staged in a folder, or in NATS: the same results either way."""
    return Lifecycle(changed(settings, staging=request.param))


def test_success_acks_only_after_the_run(either_path: Lifecycle, tmp_path: Path) -> None:
    """Messages stay unacked while the run is pending and are acked on the tick after it succeeded."""
    life, settings = either_path, either_path.settings
    run(publish(settings.nats_url, [synced("evt-a"), synced("evt-b", "u-2")]))
    report = life.tick()
    (batch,) = report.to_request
    assert report.fetched == {"SIGNALS": 2}
    assert lag(settings)["SIGNALS"] == 2, "nothing may be acked before the run has run"

    report = life.tick()  # run not there yet: asked again
    assert report.to_request == [batch]
    assert report.kept_alive == 0, "+WPI is due only once ack_wait/4 has passed (see the keep-alive test)"

    assert life.execute(batch)
    assert lag(settings)["SIGNALS"] == 2, "a succeeded run alone acks nothing; the tick settles"
    report = life.tick()
    assert report.to_request == []
    assert report.acked == 2 and report.settled_batches == 1
    assert caught_up(settings)
    assert not list((tmp_path / "staging").iterdir()), "a settled batch leaves no staged files"
    rows = query(tmp_path / "store.duckdb", "SELECT user_id, signal_count_total FROM user_features ORDER BY 1")
    assert rows == [("u-1", 1), ("u-2", 1)]


def test_failed_run_naks_with_delay_then_dead_letters_on_last_delivery(either_path: Lifecycle, tmp_path: Path) -> None:
    """max_deliver=3: two failed runs NAK (1 s, then 2 s delay), the third dead-letters with the run's error."""
    life, settings = either_path, either_path.settings
    run(publish(settings.nats_url, [synced("evt-fail")]))
    for attempt in range(1, 4):
        report = life.tick_until_request()
        assert report.fetched == {"SIGNALS": 1}
        assert not life.execute(report.to_request[0], fail=True)
        report = life.tick()
        if attempt < 3:
            assert (report.nacked, report.dead_lettered) == (1, 0)
        else:
            assert (report.nacked, report.dead_lettered) == (0, 1)
    dead = run(stream_messages(settings.nats_url, "DEADLETTER"))
    assert len(dead) == 1
    msg = dead[0]
    assert msg.subject == "deadletter.signals.task.synced"
    assert msg.headers["FP-Delivery-Count"] == "3"
    assert msg.headers["FP-Original-Stream"] == "SIGNALS"
    assert "gave up after 3 deliveries" in msg.headers["FP-Reason"]
    assert "fail-run" in msg.headers["FP-Reason"], "the reason carries the run's own error"
    assert b'"id":"evt-fail"' in msg.data, "the dead letter keeps the original body"
    assert caught_up(settings, ("SIGNALS",)), "the original is TERMed"
    assert query(tmp_path / "store.duckdb", "SELECT count(*) FROM signal_events") == [(0,)]


def test_redelivery_waits_for_the_nak_delay(settings: Settings) -> None:
    """A NAK after a failed run carries a delay: the message is not back at once."""
    life = Lifecycle(changed(settings, nak_delay_seconds=3))
    run(publish(settings.nats_url, [synced("evt-delay")]))
    (batch,) = life.tick().to_request
    assert not life.execute(batch, fail=True)
    report = life.tick()
    assert report.nacked == 1
    naked_at = time.monotonic()
    report = life.tick()
    assert report.to_request == [] and not report.fetched, "redelivered before the NAK delay"
    life.tick_until_request(timeout=10)
    assert time.monotonic() - naked_at >= 2.5


def test_poison_is_dead_lettered_by_its_run_and_batch_mates_are_stored(either_path: Lifecycle, tmp_path: Path) -> None:
    """The sensor stages poison unparsed with the rest; the run copies it to DEADLETTER before it succeeds, and
    the settle acks the whole batch."""
    life, settings = either_path, either_path.settings
    url = settings.nats_url
    bad_type = make_envelope("evt-wrong", "task.completed", "u-1", datetime.now(UTC), {"task_id": "t"})
    run(publish(url, [synced("evt-ok1"), ("signals.task.synced", b"{not json"), ("signals.task.synced", bad_type)]))
    run(publish(url, [synced("evt-ok2")]))
    report = life.tick()
    assert report.fetched == {"SIGNALS": 4} and len(report.to_request) == 1
    assert len(run(stream_messages(url, "DEADLETTER"))) == 0, "nothing is dead-lettered before the run"
    assert life.execute(report.to_request[0])
    assert len(run(stream_messages(url, "DEADLETTER"))) == 2, "the run copied its poison before it succeeded"
    # This tick settles the batch and fetches the two dead letters from DEADLETTER into a new one.
    report = life.tick()
    assert report.fetched == {"DEADLETTER": 2}
    assert life.execute(report.to_request[0])
    life.tick()
    assert query(tmp_path / "store.duckdb", "SELECT event_id FROM signal_events ORDER BY 1") == [
        ("evt-ok1",),
        ("evt-ok2",),
    ]
    reasons = dict(query(tmp_path / "store.duckdb", "SELECT original_seq, reason FROM dead_letters"))
    assert sorted(reasons) == [2, 3]
    assert reasons[2].startswith("not valid JSON")
    assert "does not match subject 'signals.task.synced'" in reasons[3]
    assert caught_up(settings)


def test_a_failed_runs_poison_copy_is_kept_once_when_its_batch_is_stored_again(lifecycle: Lifecycle) -> None:
    """A run copies its poison to DEADLETTER and then fails: the batch is split and stored again, its poison
    copied again under the same Nats-Msg-Id, which the stream drops. One copy, one dead_letters row."""
    settings = lifecycle.settings
    url, db = settings.nats_url, Path(settings.feature_store_path)
    run(publish(url, [synced("evt-ok"), ("signals.task.synced", b"{not json")]))
    (batch,) = lifecycle.tick().to_request
    assert not lifecycle.execute(batch, fail=True)
    assert len(run(stream_messages(url, "DEADLETTER"))) == 1, "the failed run copied its poison first"
    lifecycle.drain()
    assert len(run(stream_messages(url, "DEADLETTER"))) == 1, "the second copy was dropped as a duplicate"
    assert query(db, "SELECT original_seq FROM dead_letters") == [(2,)]
    assert stored_ids(settings) == ["evt-ok"]
    assert caught_up(settings) and redeliveries(settings) == 0


def test_a_tick_stages_one_batch_and_the_rest_joins_the_next(settings: Settings) -> None:
    """Runs store one batch at a time, so a tick stages at most one (its users' refresh would otherwise be
    paid twice): 25 messages with batches of 10 are one batch of 10 on the first tick, all stored in the end."""
    life = Lifecycle(changed(settings, batch_max_messages=10))
    run(publish(settings.nats_url, [synced(f"evt-{i}", f"u-{i % 3}") for i in range(25)]))
    report = life.tick()
    assert len(report.to_request) == 1 and report.fetched == {"SIGNALS": 10}
    life.drain()
    assert sorted(stored_ids(settings)) == sorted(f"evt-{i}" for i in range(25))
    assert caught_up(settings)


def test_dead_letter_copies_of_another_pipeline_on_the_streams_are_acked_not_recorded(lifecycle: Lifecycle) -> None:
    """Two pipelines on the same streams (two Component instances) both read DEADLETTER: each records its
    own copies and those other clients published, and acks the other pipeline's without recording them."""
    settings = lifecycle.settings

    async def copies() -> None:
        async with await Broker.connect(settings.nats_url) as broker:
            await topology.ensure_streams(broker, PACKAGED)
            for seq, pipeline in ((11, settings.durable_prefix), (12, "feature-pipeline-other"), (13, None)):
                headers = {streams.H_STREAM: "SIGNALS", streams.H_SEQUENCE: str(seq), streams.H_REASON: "r"}
                if pipeline is not None:
                    headers[streams.H_PIPELINE] = pipeline
                await broker.js.publish("deadletter.signals.task.synced", b"{}", headers=headers)

    run(copies())
    lifecycle.drain()
    db = Path(settings.feature_store_path)
    assert query(db, "SELECT original_seq FROM dead_letters ORDER BY 1") == [(11,), (13,)]
    assert caught_up(settings), "the other pipeline's copy is acked too"
    assert redeliveries(settings) == 0


@pytest.mark.parametrize("staging", ["folder", "nats"])
def test_keep_alive_stops_ack_wait_redelivery(settings: Settings, nats_server: LocalNats, staging: str) -> None:
    """ack_wait=4 s, run pending for 7 s, ticks every 1.2 s: the batch is never redelivered."""
    fast_clock = unchecked(changed(settings, durable_prefix="ka", staging=staging), ack_wait_seconds=4)
    life = Lifecycle(fast_clock)
    run(publish(nats_server.url, [synced("evt-slow")]))
    (batch,) = life.tick().to_request
    start = time.monotonic()
    while time.monotonic() - start < 7:
        time.sleep(1.2)
        report = life.tick()
        assert report.kept_alive == 1
        assert not report.fetched, "the pending message was redelivered despite +WPI"
    assert life.execute(batch)
    report = life.tick()
    assert report.acked == 1
    info = run(consumer_states(nats_server.url, "ka"))["SIGNALS"]
    assert info.num_redelivered == 0 and info.num_ack_pending == 0


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "public API"])
def test_nats_down_keeps_batches_in_flight_and_settles_after_restart(
    settings: Settings, nats_server: LocalNats, tmp_path: Path, fast: bool
) -> None:
    """Settle cannot reach NATS: the batch stays staged, the tick says why, and a later tick acks it.

    Acks sent while a SIGKILLed server is still recovering its consumer can be dropped without an
    error; then ack_wait (5 s here) redelivers the batch and the event ids absorb it. Either way the
    end state must be: both events stored once, nothing pending. (Batches staged in a folder: with
    batches staged in NATS a tick cannot read them while NATS is down; test_shared_staging.py.)"""
    life = Lifecycle(unchecked(settings, ack_wait_seconds=5), options=TickOptions(fast_path=fast))
    settings = life.settings
    run(publish(nats_server.url, [synced("evt-x"), synced("evt-y")]))
    (batch,) = life.tick().to_request
    nats_server.kill()
    assert life.execute(batch), "the run needs no NATS"
    report = life.tick()
    assert report.problem and f"cannot reach NATS at {nats_server.url}" in report.problem
    assert report.in_flight == 1 and report.to_request == []
    assert len(list((tmp_path / "staging").iterdir())) == 1
    nats_server.start()
    acked, deadline = 0, time.monotonic() + 40
    while time.monotonic() < deadline:
        report = life.tick()
        acked += report.acked
        for again in report.to_request:  # a redelivered copy, if the first acks were lost
            assert life.execute(again)
        if acked >= 2 and not report.in_flight and caught_up(settings, ("SIGNALS",), timeout=1):
            break
        time.sleep(0.3)
    assert acked >= 2, "the staged batch was never acked after NATS came back"
    assert caught_up(settings, ("SIGNALS",))
    assert query(tmp_path / "store.duckdb", "SELECT event_id FROM signal_events ORDER BY 1") == [("evt-x",), ("evt-y",)]
    assert query(tmp_path / "store.duckdb", "SELECT signal_count_total FROM user_features") == [(2,)]


def test_orphan_batch_gets_its_run_requested_again(lifecycle: Lifecycle) -> None:
    """A batch staged by a tick whose run request was lost (daemon died) is requested again, same batch id."""
    run(publish(lifecycle.settings.nats_url, [synced("evt-o")]))
    (batch,) = lifecycle.tick().to_request
    (again,) = lifecycle.tick().to_request
    assert again == batch


def test_a_failing_message_is_bisected_out_and_only_it_spends_deliveries(
    either_path: Lifecycle, tmp_path: Path
) -> None:
    """One event breaks any batch that holds it (the fail-marked drill): its batch is split until it is
    alone; its 7 batch-mates are stored on their first delivery, and only it is NAKed, redelivered and,
    after NATS_MAX_DELIVER=3 deliveries, dead-lettered with the run's error."""
    settings = changed(either_path.settings, faults="fail-marked")
    life = Lifecycle(settings, options=either_path.options)
    ids = [f"evt-{i}" for i in range(8)]
    ids[5] = "fail-5"
    run(publish(settings.nats_url, [synced(i, f"u-{n % 3}") for n, i in enumerate(ids)]))
    life.drain(timeout=90)
    assert sorted(stored_ids(settings)) == sorted(i for i in ids if i != "fail-5")
    ((seq, count, reason),) = query(
        tmp_path / "store.duckdb", "SELECT original_seq, delivery_count, reason FROM dead_letters"
    )
    assert (seq, count) == (6, 3) and "gave up after 3 deliveries" in reason and "event fail-5 breaks" in reason
    assert redeliveries(settings) == 2, "only the culprit was redelivered"


def test_batch_staged_from_several_pulls_is_settled_as_one(either_path: Lifecycle, tmp_path: Path) -> None:
    """A batch grows over several pulls (of 2 here) into one run: when that run fails because of its
    messages, the batch is split into halves (every message of every pull in one of them, none NAKed);
    the halves' successful runs ack them all, stored once."""
    life = Lifecycle(either_path.settings, options=TickOptions(fetch_chunk=2, fast_path=either_path.options.fast_path))
    settings = life.settings
    run(publish(settings.nats_url, [synced(f"evt-{i}", f"u-{i % 2}") for i in range(5)]))
    report = life.tick()
    (batch,) = report.to_request
    assert report.fetched == {"SIGNALS": 5} and [m.size for m in report.staged] == [5]
    assert not life.execute(batch, fail=True)
    report = life.tick()
    assert (report.nacked, report.acked) == (0, 0) and not report.fetched
    assert report.to_request == [f"{batch}-a", f"{batch}-b"] and [m.size for m in report.staged] == [2, 3]
    assert report.bisected and "fail-run" in report.bisected[0]
    assert all(life.execute(half) for half in report.to_request)
    report = life.tick()
    assert (report.acked, report.nacked, report.settled_batches) == (5, 0, 2)
    assert redeliveries(settings) == 0
    assert caught_up(settings)
    assert query(tmp_path / "store.duckdb", "SELECT count(*) FROM signal_events") == [(5,)]
    assert query(tmp_path / "store.duckdb", "SELECT user_id, signal_count_total FROM user_features ORDER BY 1") == [
        ("u-0", 3),
        ("u-1", 2),
    ]


def test_fetch_time_ends_the_batch_and_the_tick(settings: Settings) -> None:
    """Past the tick's fetch time no further pull starts: the batch so far is staged and the rest waits."""

    def slow_pull(deliveries: Sequence[Delivery]) -> None:
        time.sleep(0.6)  # two pulls take longer than the second of fetch time

    life = Lifecycle(changed(settings, fetch_seconds=1), options=TickOptions(fetch_chunk=2, on_pull=slow_pull))
    run(publish(settings.nats_url, [synced(f"evt-{i}") for i in range(6)]))
    report = life.tick()
    assert len(report.to_request) == 1
    assert report.fetched == {"SIGNALS": 2}, "a pull that would end past the fetch time is not started"
    assert len(report.staged) == 1
    assert lag(settings)["SIGNALS"] == 6, "the rest is still pending"


def test_no_new_batch_while_one_waits_for_its_run(lifecycle: Lifecycle) -> None:
    """A second batch behind one whose run has not started would only add a run's start-up: the new
    messages wait in the stream and join the next batch once the run has started or ended."""
    url = lifecycle.settings.nats_url
    run(publish(url, [synced("evt-1")]))
    (batch,) = lifecycle.tick().to_request
    run(publish(url, [synced("evt-2"), synced("evt-3")]))
    report = lifecycle.tick()
    assert report.to_request == [batch] and not report.fetched
    assert report.holding == batch and "waits for its run to start" in report.summary()
    lifecycle.runs.queue(batch)  # queued is still waiting to start
    assert lifecycle.tick().holding == batch
    assert lifecycle.execute(batch)
    report = lifecycle.tick()
    (batch2,) = report.to_request
    assert report.acked == 1 and report.fetched == {"SIGNALS": 2} and report.staged[0].size == 2
    assert lifecycle.execute(batch2)
    lifecycle.tick()
    assert caught_up(lifecycle.settings)


def test_a_started_run_does_not_hold_new_batches_back(lifecycle: Lifecycle) -> None:
    """Once a batch's run has left the queue, new messages go into a new batch at once."""
    url = lifecycle.settings.nats_url
    run(publish(url, [synced("evt-1")]))
    (batch,) = lifecycle.tick().to_request
    lifecycle.runs.finish(batch, "STARTED")
    run(publish(url, [synced("evt-2")]))
    report = lifecycle.tick()
    assert report.holding is None and report.fetched == {"SIGNALS": 1} and report.in_flight == 2
