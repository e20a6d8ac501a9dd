"""The fault matrix, in-process: real nats-server, real DuckDB files, real Dagster runs (materialize),
with the sensor tick driven by hand so each fault lands exactly where it is meant to.
Faults that need the daemon itself (killed daemon, killed run worker) are in test_e2e.py."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feature_pipeline.broker import Broker
from feature_pipeline.cli import publish_events
from feature_pipeline.defs.assets import ingest_batch
from feature_pipeline.defs.resources import FeatureStoreResource, NatsResource
from feature_pipeline.envelopes import PoisonMessage, validate
from feature_pipeline.localnats import LocalNats
from feature_pipeline.testing import consumer_states, query, run
from feature_pipeline_tests.conftest import build_resources
from feature_pipeline_tests.test_sensor_tick import _caught_up, _execute, _lag, _publish, _synced, _tick, replace

SUBJECTS = ["signals.task.synced", "signals.task.completed", "feedback.recommendation.shown"]


def _drain(inst: dg.DagsterInstance, res: dict[str, Any], rounds: int = 40) -> None:
    """Tick and run what the ticks ask for until every consumer is at lag 0 and nothing is staged."""
    for _ in range(rounds):
        requests, report = _tick(inst, res)
        for req in requests:
            _execute(inst, res, req)
        if not requests and report.problem is None and not report.in_flight and not any(_lag(res).values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"not drained: lag {_lag(res)}, last tick: {report.summary()}")


def _stored(tmp_path: Path) -> list[str]:
    db = tmp_path / "store.duckdb"
    return [
        r[0] for r in query(db, "SELECT event_id FROM signal_events UNION ALL SELECT event_id FROM feedback_events")
    ]


def test_nats_killed_at_random_moments_during_fetch_run_and_acks(
    resources: dict[str, Any], nats_server: LocalNats, tmp_path: Path
) -> None:
    """SIGKILL nats-server at random points while ticks fetch, stage and ack (in a thread, so the kill
    lands inside the NATS calls), restart it on the same store: every event stored exactly once."""
    rng = random.Random(7)
    published = run(publish_events(nats_server.url, subjects=SUBJECTS, users=["a", "b", "c"], count=600, rate=None))
    resources["ingest"] = replace(resources["ingest"], batch_max_messages=100)
    kills = 0
    with dg.instance_for_test() as inst:
        for _ in range(12):
            box: dict[str, Any] = {}
            t = threading.Thread(target=lambda: box.update(r=_tick(inst, resources)))  # noqa: B023
            t.start()
            time.sleep(rng.uniform(0.0, 0.08))
            nats_server.kill()
            kills += 1
            t.join(30)
            assert not t.is_alive(), "a tick hung after NATS died"
            for req in box.get("r", ([], None))[0]:
                _execute(inst, resources, req)  # runs need no NATS
            nats_server.start()
        _drain(inst, resources)
    stored = _stored(tmp_path)
    assert sorted(stored) == sorted(published), "lost or doubled events"
    totals = query(tmp_path / "store.duckdb", "SELECT sum(signal_count_total) FROM user_features")[0][0]
    assert totals == len(query(tmp_path / "store.duckdb", "SELECT 1 FROM signal_events"))
    assert kills == 12


def test_ack_wait_expiry_while_queued_is_deduplicated(
    nats_server: LocalNats, resources: dict[str, Any], tmp_path: Path
) -> None:
    """Keep-alive off, ack_wait 10 s, run waits 12 s: the server redelivers the message, but no second
    batch is staged while the first still waits for its run; the run succeeds, its (late) ack settles
    the message, and the event is stored once with nothing left pending."""
    resources["nats"] = NatsResource(url=nats_server.url, durable_prefix="aw", max_deliver=5, ack_wait_seconds=10)
    resources["ingest"] = replace(resources["ingest"], faults="no-keepalive")
    run(_publish(nats_server.url, [_synced("evt-slowpoke")]))
    with dg.instance_for_test() as inst:
        (first,), _ = _tick(inst, resources)
        time.sleep(12)
        requests, report = _tick(inst, resources)
        assert report.kept_alive == 0 and report.holding == first.run_key and not report.fetched
        assert [r.run_key for r in requests] == [first.run_key]
        assert _execute(inst, resources, first)
        acked = 0
        for _ in range(3):  # a copy redelivered before the ack landed is staged, stored again (absorbed), acked
            requests, report = _tick(inst, resources)
            acked += report.acked
            for again in requests:
                assert _execute(inst, resources, again)
        assert acked >= 1
    assert _stored(tmp_path) == ["evt-slowpoke"]
    assert query(tmp_path / "store.duckdb", "SELECT signal_count_total FROM user_features") == [(1,)]
    info = run(consumer_states(nats_server.url, "aw"))["SIGNALS"]
    assert info.num_pending + info.num_ack_pending == 0


_HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def test_a_second_writer_holding_the_file_makes_the_run_wait_not_fail(
    resources: dict[str, Any], tmp_path: Path
) -> None:
    """Another process (a backfill, a notebook) holds DuckDB's write lock for 4 s: the ingest run waits."""
    db = tmp_path / "store.duckdb"
    run(_publish(resources["nats"].url, [_synced("evt-patient")]))
    with dg.instance_for_test() as inst:
        (req,), _ = _tick(inst, resources)
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(db), "4"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        start = time.monotonic()
        assert _execute(inst, resources, req), "the run failed instead of waiting for the lock"
        assert time.monotonic() - start >= 2, "the run did not actually wait for the other writer"
        holder.wait(10)
        _tick(inst, resources)
    assert _stored(tmp_path) == ["evt-patient"]


def test_unwritable_staging_stops_fetching_without_burning_deliveries(
    resources: dict[str, Any], tmp_path: Path
) -> None:
    """The staging folder cannot be written (here: its path is a file): the tick says so and fetches
    nothing, so no delivery counts towards NATS_MAX_DELIVER; once it is fixed, ingest resumes."""
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    good_ingest = resources["ingest"]
    resources["ingest"] = replace(good_ingest, staging_dir=str(blocked / "staging"))
    run(_publish(resources["nats"].url, [_synced("evt-wait")]))
    with dg.instance_for_test() as inst:
        for _ in range(3):
            requests, report = _tick(inst, resources)
            assert requests == [] and not report.fetched
            assert report.problem and "is not writable" in report.problem and str(blocked) in report.problem
        info = run(consumer_states(resources["nats"].url, "t"))["SIGNALS"]
        assert info.num_pending == 1 and info.num_ack_pending == 0 and info.num_redelivered == 0
        resources["ingest"] = good_ingest
        _drain(inst, resources)
    assert _stored(tmp_path) == ["evt-wait"]


def test_unwritable_store_fails_the_run_clearly_and_nothing_is_acked(resources: dict[str, Any], tmp_path: Path) -> None:
    """The DuckDB path cannot be created: the run fails saying so, the message is NAKed (not acked) and
    stored once the path is fixed."""
    blocked = tmp_path / "blocked-db"
    blocked.write_text("not a folder")
    good_store = resources["feature_store"]
    resources["feature_store"] = FeatureStoreResource(path=str(blocked / "store.duckdb"))
    run(_publish(resources["nats"].url, [_synced("evt-disk")]))
    with dg.instance_for_test() as inst:
        (req,), _ = _tick(inst, resources)
        result = dg.materialize(
            [ingest_batch],
            instance=inst,
            resources=resources,
            tags=req.tags,
            raise_on_error=False,
        )
        assert not result.success
        failure = result.get_step_failure_events()[0].step_failure_data.error
        while failure.cause is not None:
            failure = failure.cause
        assert str(blocked) in failure.message
        _, report = _tick(inst, resources)
        assert report.nacked == 1 and report.acked == 0
        resources["feature_store"] = good_store
        _drain(inst, resources)
    assert _stored(tmp_path) == ["evt-disk"]


def test_nats_unreachable_at_start_recovers_by_itself(tmp_path: Path, resources: dict[str, Any]) -> None:
    server = LocalNats(tmp_path / "late-nats")
    resources["nats"] = NatsResource(url=server.url, durable_prefix="t", max_deliver=3, ack_wait_seconds=30)
    with dg.instance_for_test() as inst:
        requests, report = _tick(inst, resources)
        assert requests == [] and report.problem.startswith(f"cannot reach NATS at {server.url}")
        server.start()
        try:
            run(_publish(server.url, [_synced("evt-late-start")]))
            _drain(inst, resources)
        finally:
            server.kill()
    assert _stored(tmp_path) == ["evt-late-start"]


def test_consumers_and_streams_changed_under_the_pipeline(resources: dict[str, Any], tmp_path: Path) -> None:
    """A deleted consumer is recreated (its redelivered backlog deduplicated), a consumer whose settings
    were changed is put back, a deleted stream is recreated: the tick never silently stops."""
    url = resources["nats"].url
    run(_publish(url, [_synced("evt-1"), _synced("evt-2")]))
    with dg.instance_for_test() as inst:
        _drain(inst, resources)

        async def tamper() -> None:
            async with await Broker.connect(url) as b:
                await b.js.delete_consumer("SIGNALS", "t-signals")
                info = await b.js.consumer_info("FEEDBACK", "t-feedback")
                cfg = info.config
                cfg.max_deliver = 1
                await b.js.add_consumer("FEEDBACK", cfg)
                await b.js.delete_stream("DEADLETTER")

        run(tamper())
        run(_publish(url, [_synced("evt-3")]))
        _drain(inst, resources)
        infos = run(consumer_states(url, "t"))
        assert infos["FEEDBACK"].config.max_deliver == 3, "the changed consumer was not put back"
        assert set(infos) == {"SIGNALS", "FEEDBACK", "DEADLETTER"}
    assert sorted(_stored(tmp_path)) == ["evt-1", "evt-2", "evt-3"]
    assert query(tmp_path / "store.duckdb", "SELECT signal_count_total FROM user_features") == [(3,)]


def test_canceled_run_redelivers_its_batch(resources: dict[str, Any], tmp_path: Path) -> None:
    """A run canceled from the UI ends CANCELED: its batch is NAKed, never acked, and stored later."""
    run(_publish(resources["nats"].url, [_synced("evt-cancel")]))
    with dg.instance_for_test() as inst:
        (req,), _ = _tick(inst, resources)
        from feature_pipeline.definitions import defs

        job = defs.resolve_job_def("ingest")
        canceled = inst.create_run_for_job(job, tags=req.tags)
        inst.report_run_canceled(canceled, "canceled from the UI (test)")
        _, report = _tick(inst, resources)
        assert report.nacked == 1 and report.acked == 0
        _drain(inst, resources)
    assert _stored(tmp_path) == ["evt-cancel"]


def test_duplicate_id_with_different_content_is_recorded_not_silently_merged(
    resources: dict[str, Any], tmp_path: Path
) -> None:
    url = resources["nats"].url
    twin = _synced("evt-twin", total=5)
    run(_publish(url, [twin]))
    with dg.instance_for_test() as inst:
        _drain(inst, resources)
        # The exact same event again (absorbed) and one that reuses its id for other content (recorded).
        run(_publish(url, [twin, _synced("evt-twin", total=99)]))
        _drain(inst, resources)
    db = tmp_path / "store.duckdb"
    assert query(db, "SELECT latest_tasks_total, signal_count_total FROM user_features") == [(5, 1)]
    (reason,) = query(db, "SELECT reason FROM dead_letters")
    assert reason[0] == "duplicate id evt-twin with different content; kept the first stored version (SIGNALS #1)"
    assert query(db, "SELECT original_seq FROM dead_letters") == [(3,)]


_BODIES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(max_size=20),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=5), c),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda i, u, ts: _synced(i, u)[1].replace(b'"occurred_at":"', b'"occurred_at":"' + ts.encode() + b"|"),
        st.text(min_size=1, max_size=30),
        st.text(min_size=1, max_size=30),
        st.sampled_from(["", "x", "2026-13-01"]),
    ),
    st.builds(lambda i, u: _synced(i, u)[1], st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40)),
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(_BODIES, min_size=1, max_size=25))
def test_any_input_is_stored_or_dead_lettered_and_the_rest_of_the_batch_survives(
    bodies: list[bytes], tmp_path_factory: Any
) -> None:
    """Random bytes, odd JSON, odd ids and users, bad timestamps, next to one good event: nothing crashes,
    nothing fails a run, every message is either stored or has a dead-letter reason, lag ends at 0."""
    root = tmp_path_factory.mktemp("fuzz")
    server = LocalNats(root / "nats").start()
    bodies = [*bodies, _synced("evt-anchor")[1]]
    # What the contract says should happen to each body, in publish (= stream) order.
    first: dict[str, tuple[Any, ...]] = {}
    poison = conflicts = 0
    for body in bodies:
        try:
            ev = validate("signals.task.synced", body)
        except PoisonMessage:
            poison += 1
            continue
        content = (ev.user_id, ev.type, ev.occurred_at, ev.data_json)
        conflicts += first.setdefault(ev.event_id, content) != content
    try:
        res = build_resources(root, server.url)
        run(_publish(server.url, [("signals.task.synced", b) for b in bodies]))
        with dg.instance_for_test() as inst:
            _drain(inst, res)
        db = root / "store.duckdb"
        assert sorted(r[0] for r in query(db, "SELECT event_id FROM signal_events")) == sorted(first)
        reasons = [r[0] for r in query(db, "SELECT reason FROM dead_letters")]
        assert len(reasons) == poison + conflicts and all(reasons), "every other message has a dead-letter reason"
        assert _caught_up(res)
    finally:
        server.kill()


def test_named_bad_inputs_in_one_batch(resources: dict[str, Any], tmp_path: Path) -> None:
    """Edge cases the property test is unlikely to draw: a payload at the server's max size, JSON nested
    too deep to parse, SQL-looking ids and types, odd headers, far past and future timestamps."""
    url = resources["nats"].url
    now = "2026-11-27T05:00:00Z"
    sql_type = "x');DROP_TABLE_feedback_events;--"

    def envelope(event_id: str, user: str, data: Any = None, type_: str = "task.completed", ts: str = now) -> bytes:
        body = {"id": event_id, "type": type_, "occurred_at": ts, "user_id": user, "schema_version": 1}
        return json.dumps({**body, "data": {"task_id": "t-1"} if data is None else data}).encode()

    async def publish() -> int:
        async with await Broker.connect(url) as b:
            await b.ensure_streams()
            max_payload = b.nc.max_payload
            big = envelope("evt-big", "u-big", {"task_id": "t", "blob": ""})
            big = envelope("evt-big", "u-big", {"task_id": "t", "blob": "x" * (max_payload - len(big) - 300)})
            items = [
                ("signals.task.completed", big, None),
                ("signals.task.completed", b"[" * 100_000 + b"]" * 100_000, None),
                ("signals.task.completed", envelope("evt-sql", "'; DROP TABLE signal_events; --"), None),
                # NATS subjects have no spaces; quotes, parentheses and semicolons are allowed.
                (f"signals.{sql_type}", envelope("evt-sqltype", "u-1", type_=sql_type), None),
                ("signals.task.completed", envelope("evt-headers", "u-ü✓"), {"X-Odd": "ünïcode ✓", "Status": "100"}),
                ("signals.task.completed", envelope("evt-past", "u-1", ts="0001-01-02T00:00:00Z"), None),
                ("signals.task.completed", envelope("evt-future", "u-1", ts="9999-12-30T00:00:00+00:00"), None),
            ]
            for subject, body, headers in items:
                await b.js.publish(subject, body, headers=headers)
            return max_payload

    max_payload = run(publish())
    with dg.instance_for_test() as inst:
        _drain(inst, resources)
    db = tmp_path / "store.duckdb"
    stored = {r[0]: r[1] for r in query(db, "SELECT event_id, length(CAST(data AS VARCHAR)) FROM signal_events")}
    assert set(stored) == {"evt-big", "evt-sql", "evt-sqltype", "evt-headers", "evt-past", "evt-future"}
    assert stored["evt-big"] > max_payload - 1000, "the max-size payload is stored whole"
    users = {r[0] for r in query(db, "SELECT user_id FROM user_features")}
    assert "'; DROP TABLE signal_events; --" in users and "u-ü✓" in users
    assert query(db, "SELECT count(*) FROM feedback_events") == [(0,)], "the SQL-looking type was stored as text"
    (reason,) = query(db, "SELECT reason FROM dead_letters")
    assert reason[0].startswith("not valid JSON") and "recursion" in reason[0].lower()
    assert _caught_up(resources)


def test_messages_the_server_gives_up_on_are_rescued_to_the_dead_letters(
    nats_server: LocalNats, resources: dict[str, Any], tmp_path: Path
) -> None:
    """A sensor that keeps crashing between fetch and stage never settles anything: after max_deliver
    expired deliveries the server drops the message with only an advisory. The captured advisory makes
    the next healthy tick copy it to DEADLETTER (and so to dead_letters) instead of losing track of it."""
    resources["nats"] = NatsResource(url=nats_server.url, durable_prefix="ex", max_deliver=2, ack_wait_seconds=1)
    with dg.instance_for_test() as inst:
        _tick(inst, resources)  # creates the streams, the consumers and the advisory capture
        run(_publish(nats_server.url, [_synced("evt-orphan")]))

        async def crashed_tick() -> int:
            async with await Broker.connect(nats_server.url) as b:
                got = await b.pull("SIGNALS", "ex-signals", batch=10, max_bytes=1 << 20)
                return got[0].num_delivered if got else 0

        assert run(crashed_tick()) == 1
        time.sleep(1.5)
        assert run(crashed_tick()) == 2
        time.sleep(2.5)  # the second delivery expires too: on the next pull the server gives up on it
        dead_lettered = 0
        for _ in range(10):
            requests, report = _tick(inst, resources)
            dead_lettered += report.dead_lettered
            for req in requests:
                _execute(inst, resources, req)
        assert dead_lettered == 1
        _drain(inst, resources)
    dead = query(tmp_path / "store.duckdb", "SELECT original_seq, delivery_count, reason FROM dead_letters")
    assert len(dead) == 1 and dead[0][:2] == (1, 2)
    assert dead[0][2].startswith("the server gave up after 2 deliveries that were never acked")
    assert _stored(tmp_path) == []
