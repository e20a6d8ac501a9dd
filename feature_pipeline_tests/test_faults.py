"""The fault matrix, in-process: real nats-server, real DuckDB files, the batch lifecycle driven by hand
so each fault lands exactly where it is meant to. Faults of Dagster runs (canceled, failing on an
unwritable store) are in test_sensor.py; those that need the daemon itself (killed daemon, killed
run worker) in test_e2e.py."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feature_pipeline.broker import topology
from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.deliveries import Delivery
from feature_pipeline.broker.local import LocalNats
from feature_pipeline.contract import validate
from feature_pipeline.envelopes import PoisonMessage, make_envelope
from feature_pipeline.ingest.tick import TickOptions
from feature_pipeline.samples import publish_events
from feature_pipeline.settings import MIB, Settings
from feature_pipeline.streams import PACKAGED
from feature_pipeline.testing import consumer_states, query, run
from feature_pipeline_tests.helpers import (
    Lifecycle,
    caught_up,
    changed,
    data_for,
    fill,
    publish,
    redeliveries,
    settings_for,
    stored_ids,
    synced,
    unchecked,
)

SUBJECTS = ["signals.task.synced", "signals.task.completed", "feedback.recommendation.shown"]


def test_nats_killed_at_random_moments_during_fetch_run_and_acks(
    settings: Settings, nats_server: LocalNats, tmp_path: Path
) -> None:
    """SIGKILL nats-server at random points while ticks fetch, stage and ack (in a thread, so the kill
    lands inside the NATS calls), restart it on the same store: every event stored exactly once."""
    rng = random.Random(7)
    published = run(publish_events(nats_server.url, subjects=SUBJECTS, users=["a", "b", "c"], count=600, rate=None))
    # ack_wait 10 s: what a killed tick had fetched comes back sooner (redelivered, and absorbed).
    life = Lifecycle(changed(settings, batch_max_messages=100, ack_wait_seconds=10))
    kills = 0
    for _ in range(12):
        box: dict[str, Any] = {}
        t = threading.Thread(target=lambda: box.update(r=life.tick()))  # noqa: B023
        t.start()
        time.sleep(rng.uniform(0.0, 0.08))
        nats_server.kill()
        kills += 1
        t.join(30)
        assert not t.is_alive(), "a tick hung after NATS died"
        report = box.get("r")
        for batch_id in report.to_request if report else []:
            life.execute(batch_id)  # runs need no NATS
        nats_server.start()
    life.drain()
    stored = stored_ids(settings)
    assert sorted(stored) == sorted(published), "lost or doubled events"
    totals = query(tmp_path / "store.duckdb", "SELECT sum(signal_count_total) FROM user_features")[0][0]
    assert totals == len(query(tmp_path / "store.duckdb", "SELECT 1 FROM signal_events"))
    assert kills == 12


def test_ack_wait_expiry_while_queued_is_deduplicated(settings: Settings, nats_server: LocalNats) -> None:
    """Keep-alive off, ack_wait 10 s, run waits 12 s: the server redelivers the message, but no second
    batch is staged while the first still waits for its run; the run succeeds, its (late) ack settles
    the message, and the event is stored once with nothing left pending."""
    life = Lifecycle(changed(settings, durable_prefix="aw", max_deliver=5, ack_wait_seconds=10, faults="no-keepalive"))
    run(publish(nats_server.url, [synced("evt-slowpoke")]))
    (first,) = life.tick().to_request
    time.sleep(12)
    report = life.tick()
    assert report.kept_alive == 0 and report.holding == first and not report.fetched
    assert report.to_request == [first]
    assert life.execute(first)
    acked = 0
    for _ in range(3):  # a copy redelivered before the ack landed is staged, stored again (absorbed), acked
        report = life.tick()
        acked += report.acked
        for again in report.to_request:
            assert life.execute(again)
    assert acked >= 1
    assert stored_ids(settings) == ["evt-slowpoke"]
    assert query(Path(settings.feature_store_path), "SELECT signal_count_total FROM user_features") == [(1,)]
    info = run(consumer_states(nats_server.url, "aw"))["SIGNALS"]
    assert info.num_pending + info.num_ack_pending == 0


_HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def test_a_second_writer_holding_the_file_makes_the_run_wait_not_fail(lifecycle: Lifecycle, tmp_path: Path) -> None:
    """Another process (a backfill, a notebook) holds DuckDB's write lock for 4 s: the ingest run waits."""
    db = tmp_path / "store.duckdb"
    run(publish(lifecycle.settings.nats_url, [synced("evt-patient")]))
    (batch,) = lifecycle.tick().to_request
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(db), "4"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    start = time.monotonic()
    assert lifecycle.execute(batch), "the run failed instead of waiting for the lock"
    assert time.monotonic() - start >= 2, "the run did not actually wait for the other writer"
    holder.wait(10)
    lifecycle.tick()
    assert stored_ids(lifecycle.settings) == ["evt-patient"]


def test_unwritable_staging_stops_fetching_without_burning_deliveries(settings: Settings, tmp_path: Path) -> None:
    """The staging folder cannot be written (here: its path is a file): the tick says so and fetches
    nothing, so no delivery counts towards NATS_MAX_DELIVER; once it is fixed, ingest resumes."""
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    life = Lifecycle(changed(settings, staging_dir=blocked / "staging"))
    run(publish(settings.nats_url, [synced("evt-wait")]))
    for _ in range(3):
        report = life.tick()
        assert report.to_request == [] and not report.fetched
        assert report.problem and "is not writable" in report.problem and str(blocked) in report.problem
    info = run(consumer_states(settings.nats_url, "t"))["SIGNALS"]
    assert info.num_pending == 1 and info.num_ack_pending == 0 and info.num_redelivered == 0
    Lifecycle(settings).drain()
    assert stored_ids(settings) == ["evt-wait"]


def test_a_nearly_full_staging_disk_stops_fetching_before_any_delivery(
    settings: Settings, small_disk: Callable[[int], Path]
) -> None:
    """A real 24 MiB filesystem with 8 MiB free: too little for a batch plus the margin, so nothing is
    pulled (the deliveries stay unspent) and the tick says how much is free; freed, ingest resumes."""
    disk = small_disk(24)
    filler = fill(disk, leave_bytes=8 * MIB)
    life = Lifecycle(changed(settings, staging_dir=disk / "staging"))
    run(publish(settings.nats_url, [synced(f"evt-{i}", f"u-{i}") for i in range(50)]))
    for _ in range(2):
        report = life.tick()
        assert not report.fetched and report.to_request == []
        assert report.problem and "MiB free" in report.problem and str(disk) in report.problem
    info = run(consumer_states(settings.nats_url, "t"))["SIGNALS"]
    assert info.num_pending == 50 and info.num_ack_pending == 0 and info.delivered.consumer_seq == 0
    filler.unlink()
    life.drain()
    assert sorted(stored_ids(settings)) == sorted(f"evt-{i}" for i in range(50))
    assert redeliveries(settings) == 0


def test_disk_full_while_staging_releases_the_pulled_messages_at_once(
    settings: Settings, small_disk: Callable[[int], Path]
) -> None:
    """The disk fills up (another writer) between the space check and the batch's files: staging fails with
    a real ENOSPC, the messages already pulled are NAKed at once (not left to wait out ack_wait), fetching
    stops; once there is room every event is stored once."""
    disk = small_disk(40)
    fillers: list[Path] = []

    def fill_once(deliveries: Sequence[Delivery]) -> None:
        if not fillers:
            fillers.append(fill(disk))

    opts = TickOptions(fetch_chunk=20, on_pull=fill_once)
    life = Lifecycle(changed(settings, staging_dir=disk / "staging"), options=opts)
    run(publish(settings.nats_url, [synced(f"evt-{i}", f"u-{i}") for i in range(60)]))
    report = life.tick()
    assert report.to_request == [] and report.nacked > 0
    assert report.problem and "released to NATS at once" in report.problem and str(disk) in report.problem
    assert report.nacked == sum(report.fetched.values()) == 60, report.summary()
    fillers[0].unlink()
    started = time.monotonic()
    Lifecycle(changed(settings, staging_dir=disk / "staging")).drain(timeout=settings.ack_wait_seconds - 10)
    assert time.monotonic() - started < settings.ack_wait_seconds, "redelivered at once, not after ack_wait"
    assert sorted(stored_ids(settings)) == sorted(f"evt-{i}" for i in range(60))
    assert redeliveries(settings) == 60, "JetStream counts the delivery a NAK returns: one each, no more"


def test_nats_unreachable_at_start_recovers_by_itself(tmp_path: Path) -> None:
    server = LocalNats(tmp_path / "late-nats")
    life = Lifecycle(settings_for(tmp_path, server.url))
    report = life.tick()
    assert report.to_request == []
    assert report.problem and report.problem.startswith(f"cannot reach NATS at {server.url}")
    server.start()
    try:
        run(publish(server.url, [synced("evt-late-start")]))
        life.drain()
    finally:
        server.kill()
    assert stored_ids(life.settings) == ["evt-late-start"]


def test_consumers_and_streams_changed_under_the_pipeline(lifecycle: Lifecycle) -> None:
    """A deleted consumer is recreated (its redelivered backlog deduplicated), a consumer whose settings
    were changed is put back, a deleted stream is recreated: the tick never silently stops."""
    settings = lifecycle.settings
    url = settings.nats_url
    run(publish(url, [synced("evt-1"), synced("evt-2")]))
    lifecycle.drain()

    async def tamper() -> None:
        async with await Broker.connect(url) as b:
            await b.js.delete_consumer("SIGNALS", "t-signals")
            info = await b.js.consumer_info("FEEDBACK", "t-feedback")
            cfg = info.config
            cfg.max_deliver = 1
            await b.js.add_consumer("FEEDBACK", cfg)
            await b.js.delete_stream("DEADLETTER")

    run(tamper())
    run(publish(url, [synced("evt-3")]))
    lifecycle.drain()
    infos = run(consumer_states(url, "t"))
    assert infos["FEEDBACK"].config.max_deliver == 3, "the changed consumer was not put back"
    assert set(infos) == {"SIGNALS", "FEEDBACK", "DEADLETTER"}
    assert sorted(stored_ids(settings)) == ["evt-1", "evt-2", "evt-3"]
    assert query(Path(settings.feature_store_path), "SELECT signal_count_total FROM user_features") == [(3,)]


def test_duplicate_id_with_different_content_is_recorded_not_silently_merged(
    lifecycle: Lifecycle, tmp_path: Path
) -> None:
    url = lifecycle.settings.nats_url
    twin = synced("evt-twin", total=5)
    run(publish(url, [twin]))
    lifecycle.drain()
    # The exact same event again (absorbed) and one that reuses its id for other content (recorded).
    run(publish(url, [twin, synced("evt-twin", total=99)]))
    lifecycle.drain()
    db = tmp_path / "store.duckdb"
    assert query(db, "SELECT latest_tasks_total, signal_count_total FROM user_features") == [(5, 1)]
    (reason,) = query(db, "SELECT reason FROM dead_letters")
    assert reason[0] == "duplicate id evt-twin with different content; kept the first stored version (SIGNALS #1)"
    assert query(db, "SELECT original_seq FROM dead_letters") == [(3,)]


def test_an_id_reused_on_another_stream_is_recorded_not_stored_twice(lifecycle: Lifecycle, tmp_path: Path) -> None:
    """Ids are unique across streams: the first stored version stays; the other stream's event with the same
    id goes to dead_letters saying which event holds the id, in a later batch and in the same batch."""
    url = lifecycle.settings.nats_url
    now = datetime.now(UTC)
    shown = data_for("feedback.recommendation.shown")

    def feedback(event_id: str) -> tuple[str, bytes]:
        return "feedback.recommendation.shown", make_envelope(event_id, "recommendation.shown", "u-1", now, shown)

    run(publish(url, [synced("evt-x")]))
    lifecycle.drain()
    run(publish(url, [feedback("evt-x")]))
    lifecycle.drain()
    run(publish(url, [synced("evt-y"), feedback("evt-y")]))
    lifecycle.drain()
    db = tmp_path / "store.duckdb"
    assert sorted(stored_ids(lifecycle.settings)) == ["evt-x", "evt-y"]
    assert query(db, "SELECT count(*) FROM feedback_events") == [(0,)]
    reasons = query(db, "SELECT original_stream, original_seq, reason FROM dead_letters ORDER BY original_seq")
    assert reasons == [
        (
            "FEEDBACK",
            seq,
            f"id {eid} is already used by signals.task.synced (SIGNALS #{n}); ids must be unique "
            "across streams; kept the first stored version",
        )
        for seq, eid, n in [(1, "evt-x", 1), (2, "evt-y", 2)]
    ]
    assert query(db, "SELECT signal_count_total, rec_shown_7d FROM user_features") == [(2, 0)]


_BODIES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(max_size=20),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=5), c),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda i, u, ts: synced(i, u)[1].replace(b'"occurred_at":"', b'"occurred_at":"' + ts.encode() + b"|"),
        st.text(min_size=1, max_size=30),
        st.text(min_size=1, max_size=30),
        st.sampled_from(["", "x", "2026-13-01"]),
    ),
    st.builds(lambda i, u: synced(i, u)[1], st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40)),
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
    bodies = [*bodies, synced("evt-anchor")[1]]
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
        life = Lifecycle(settings_for(root, server.url))
        run(publish(server.url, [("signals.task.synced", b) for b in bodies]))
        life.drain()
        db = root / "store.duckdb"
        assert sorted(r[0] for r in query(db, "SELECT event_id FROM signal_events")) == sorted(first)
        reasons = [r[0] for r in query(db, "SELECT reason FROM dead_letters")]
        assert len(reasons) == poison + conflicts and all(reasons), "every other message has a dead-letter reason"
        assert caught_up(life.settings)
    finally:
        server.kill()


def test_named_bad_inputs_in_one_batch(lifecycle: Lifecycle, tmp_path: Path) -> None:
    """Edge cases the property test is unlikely to draw: a payload at the server's max size, JSON nested
    too deep to parse, SQL-looking ids and types, odd headers, far past and future timestamps."""
    url = lifecycle.settings.nats_url
    now = "2026-11-27T05:00:00Z"
    sql_type = "x');DROP_TABLE_feedback_events;--"

    def envelope(event_id: str, user: str, data: Any = None, type_: str = "task.completed", ts: str = now) -> bytes:
        body = {"id": event_id, "type": type_, "occurred_at": ts, "user_id": user, "schema_version": 1}
        return json.dumps({**body, "data": {"task_id": "t-1"} if data is None else data}).encode()

    async def publish() -> int:
        async with await Broker.connect(url) as b:
            await topology.ensure_streams(b, PACKAGED)
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
    lifecycle.drain()
    db = tmp_path / "store.duckdb"
    stored = {r[0]: r[1] for r in query(db, "SELECT event_id, length(CAST(data AS VARCHAR)) FROM signal_events")}
    assert set(stored) == {"evt-big", "evt-sql", "evt-sqltype", "evt-headers", "evt-past", "evt-future"}
    assert stored["evt-big"] > max_payload - 1000, "the max-size payload is stored whole"
    users = {r[0] for r in query(db, "SELECT user_id FROM user_features")}
    assert "'; DROP TABLE signal_events; --" in users and "u-ü✓" in users
    assert query(db, "SELECT count(*) FROM feedback_events") == [(0,)], "the SQL-looking type was stored as text"
    (reason,) = query(db, "SELECT reason FROM dead_letters")
    assert reason[0].startswith("not valid JSON") and "recursion" in reason[0].lower()
    assert caught_up(lifecycle.settings)


def test_poison_at_the_servers_max_payload_is_dead_lettered_whole_and_its_mates_stored(
    lifecycle: Lifecycle, tmp_path: Path
) -> None:
    """A non-JSON message as large as the server allows: its copy plus the dead-letter headers would be
    refused (and the connection dropped), so the copy is cut to fit and the whole body is kept in the
    DEADLETTER_BODIES object store; its batch-mates are stored, on their first delivery."""
    url = lifecycle.settings.nats_url

    async def publish_big() -> bytes:
        async with await Broker.connect(url) as b:
            await topology.ensure_streams(b, PACKAGED)
            body = b"\xff not json " + b"z" * (b.nc.max_payload - 300)
            await b.js.publish("signals.task.synced", body)
            return body

    big = run(publish_big())
    run(publish(url, [synced("evt-mate-a"), synced("evt-mate-b", "u-2")]))
    lifecycle.drain()
    assert sorted(stored_ids(lifecycle.settings)) == ["evt-mate-a", "evt-mate-b"]
    assert redeliveries(lifecycle.settings) == 0, "no delivery was lost to a dropped connection"
    ((reason, length),) = query(tmp_path / "store.duckdb", "SELECT reason, octet_length(body) FROM dead_letters")
    assert reason.startswith("not valid JSON")
    assert "kept whole in object store DEADLETTER_BODIES/SIGNALS.1" in reason
    assert 0 < length < len(big)

    async def whole_body() -> bytes:
        async with await Broker.connect(url) as b:
            store = await b.js.object_store("DEADLETTER_BODIES")
            return bytes((await store.get("SIGNALS.1")).data or b"")

    assert run(whole_body()) == big


def test_messages_the_server_gives_up_on_are_rescued_to_the_dead_letters(
    settings: Settings, nats_server: LocalNats, tmp_path: Path
) -> None:
    """A sensor that keeps crashing between fetch and stage never settles anything: after max_deliver
    expired deliveries the server drops the message with only an advisory. The captured advisory makes
    the next healthy tick copy it to DEADLETTER (and so to dead_letters) instead of losing track of it."""
    life = Lifecycle(unchecked(changed(settings, durable_prefix="ex", max_deliver=2), ack_wait_seconds=1))
    life.tick()  # creates the streams, the consumers and the advisory capture
    run(publish(nats_server.url, [synced("evt-orphan")]))

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
        report = life.tick()
        dead_lettered += report.dead_lettered
        for batch_id in report.to_request:
            life.execute(batch_id)
    assert dead_lettered == 1
    life.drain()
    dead = query(tmp_path / "store.duckdb", "SELECT original_seq, delivery_count, reason FROM dead_letters")
    assert len(dead) == 1 and dead[0][:2] == (1, 2)
    assert dead[0][2].startswith("the server gave up after 2 deliveries that were never acked")
    assert stored_ids(settings) == []
