"""The DuckDB feature store: idempotent, atomic apply of real staged batches, and the feature semantics.

Messages are acked only after the run that stored them succeeded, so every message may be
stored more than once (redelivery, a retried run): apply must absorb that exactly.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feature_pipeline import faults
from feature_pipeline.snapshot_days import first_day
from feature_pipeline.store.first_day import first_day_file, read_first_day
from feature_pipeline_tests.helpers import (
    EVENT,
    TABLES,
    Env,
    assert_rows_match_reference,
    changed,
    data_for,
    deliveries_for,
    make_env,
    settings_for,
)

FAIL = faults.before_commit({faults.FAIL_RUN})


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


NOW = datetime.now(UTC)


# -- idempotence ----------------------------------------------------------------------------


def test_apply_stores_each_event_once(env: Env) -> None:
    """A batch lands in the raw table of its stream, with its counts reported."""
    batch = [
        env.feed.event("s-1", "signals.task.synced", "u-1", NOW - timedelta(hours=1)),
        env.feed.event("s-2", "signals.task.completed", "u-1", NOW - timedelta(hours=2)),
        env.feed.event("f-1", "feedback.recommendation.shown", "u-2", NOW - timedelta(hours=3)),
    ]
    result = env.apply(batch)
    assert result.events_in_batch == 3
    assert result.new_in("SIGNALS") == 2
    assert result.new_in("FEEDBACK") == 1
    assert result.duplicates_absorbed == 0
    assert result.users_touched == 2
    assert result.user_features_rows == 2
    assert result.rows["signal_events"] == 2
    assert result.rows["feedback_events"] == 1
    assert sorted(result.event_ids) == ["f-1", "s-1", "s-2"]
    assert result.latency_max_seconds is not None and result.latency_max_seconds >= result.latency_p50_seconds >= 0
    assert result.health.consistency_checked == 2 and result.health.inconsistent_users == []
    with env.con() as con:
        assert con.execute("SELECT batch_id, events_in_batch, events_inserted FROM ingested_batches").fetchall() == [
            (result.batch_id, 3, 3)
        ]
        stored = con.execute("SELECT event_id, subject, stream_seq, type, user_id FROM signal_events ORDER BY 1")
        assert stored.fetchall() == [
            ("s-1", "signals.task.synced", 1, "task.synced", "u-1"),
            ("s-2", "signals.task.completed", 2, "task.completed", "u-1"),
        ]
    assert env.features()["u-1"]["signal_count_total"] == 2


def test_a_batch_says_where_its_time_went(env: Env) -> None:
    """The run log's `took …` comes from the phases apply_batch times: each one, in order, and the online
    write only when there is one after the commit."""
    batch_id = env.stage([env.feed.event("s-1", "signals.task.completed", "u-1", NOW - timedelta(hours=1))])
    plain = env.store.apply_batch(env.staging.path(batch_id), batch_id)
    assert list(plain.seconds) == ["open", "intake", "write", "refresh", "commit", "health"]
    assert all(s >= 0 for s in plain.seconds.values())
    again = env.store.apply_batch(env.staging.path(batch_id), batch_id, after_commit=lambda con: None)
    assert list(again.seconds) == ["open", "intake", "write", "refresh", "commit", "online", "health"]


def test_applying_the_same_batch_twice_does_not_double_count(env: Env) -> None:
    """A run retried after it committed (e.g. the ack was lost) must not count events again."""
    batch = [
        env.feed.event("s-1", "signals.task.completed", "u-1", NOW - timedelta(hours=1)),
        env.feed.event("f-1", "feedback.recommendation.shown", "u-1", NOW - timedelta(hours=1)),
    ]
    batch_id = env.stage(batch)
    first = env.store.apply_batch(env.staging.path(batch_id), batch_id)
    second = env.store.apply_batch(env.staging.path(batch_id), batch_id)
    assert (first.new_in("SIGNALS"), first.new_in("FEEDBACK"), first.duplicates_absorbed) == (1, 1, 0)
    assert (second.new_in("SIGNALS"), second.new_in("FEEDBACK"), second.duplicates_absorbed) == (0, 0, 2)
    assert env.count("signal_events") == 1
    assert env.count("feedback_events") == 1
    assert env.count("ingested_batches") == 1
    row = assert_rows_match_reference(env)["u-1"]
    assert row["signal_count_total"] == 1
    assert row["rec_shown_7d"] == 1


def test_redelivered_event_in_a_later_batch_is_absorbed(env: Env) -> None:
    """NATS redelivers after a failed run or a lost ack; the second copy must not be counted."""
    when = NOW - timedelta(hours=2)
    e2 = env.feed.event("s-2", "signals.task.completed", "u-1", when)
    env.apply([env.feed.event("s-1", "signals.task.completed", "u-1", NOW - timedelta(hours=1)), e2])
    redelivered = env.feed.event("s-2", "signals.task.completed", "u-1", when, seq=e2.stream_seq, num_delivered=2)
    assert redelivered.data == e2.data
    result = env.apply([redelivered, env.feed.event("s-3", "signals.task.completed", "u-1", NOW)])
    assert result.events_in_batch == 2
    assert result.new_in("SIGNALS") == 1
    assert result.duplicates_absorbed == 1
    assert env.count("signal_events") == 3
    assert assert_rows_match_reference(env)["u-1"]["signal_count_total"] == 3


def test_duplicate_ids_within_one_batch_count_once(env: Env) -> None:
    """A producer retry publishes the same id twice (new sequence); both copies may land in one batch."""
    when = NOW - timedelta(hours=1)
    batch = [
        env.feed.event("s-1", "signals.task.completed", "u-1", when),
        env.feed.event("s-1", "signals.task.completed", "u-1", when),
        env.feed.event("s-2", "signals.task.completed", "u-1", when),
        env.feed.event("f-1", "feedback.recommendation.accepted", "u-1", when),
        env.feed.event("f-1", "feedback.recommendation.accepted", "u-1", when),
    ]
    result = env.apply(batch)
    assert result.events_in_batch == 5
    assert result.new_in("SIGNALS") == 2
    assert result.new_in("FEEDBACK") == 1
    assert result.duplicates_absorbed == 2
    assert result.event_ids.count("s-1") == 1
    with env.con() as con:
        assert con.execute("SELECT stream_seq FROM signal_events WHERE event_id = 's-1'").fetchall() == [(1,)]
    row = assert_rows_match_reference(env)["u-1"]
    assert row["signal_count_total"] == 2
    assert row["rec_accepted_7d"] == 1


def test_dead_letters_land_once(env: Env) -> None:
    """A dead letter is keyed by its original stream and sequence, however often it is copied or redelivered."""
    dl_a = env.feed.dead_letter("SIGNALS", 4, reason="gave up after 5 deliveries")
    dl_a_copy = env.feed.dead_letter("SIGNALS", 4, reason="second copy")
    dl_b = env.feed.dead_letter("FEEDBACK", 4)
    event = env.feed.event("s-1", "signals.task.completed", "u-1", NOW - timedelta(hours=1))
    first = env.apply([dl_a, event, dl_a_copy, dl_b])
    assert first.dead_letters_inserted == 2
    assert first.events_in_batch == 1
    assert first.new_in("SIGNALS") == 1

    again = env.apply([env.feed.dead_letter("SIGNALS", 4), dl_b])
    assert again.dead_letters_inserted == 0
    assert again.users_touched == 0
    assert again.user_features_rows == 1

    with env.con() as con:
        rows = con.execute(
            "SELECT original_stream, original_seq, original_subject, delivery_count, reason, deadletter_seq, body "
            "FROM dead_letters ORDER BY original_stream"
        ).fetchall()
    assert rows == [
        ("FEEDBACK", 4, "signals.task.synced", 5, "gave up", dl_b.stream_seq, b"{oops"),
        ("SIGNALS", 4, "signals.task.synced", 5, "gave up after 5 deliveries", dl_a.stream_seq, b"{oops"),
    ]


def test_fail_before_commit_leaves_everything_unchanged(env: Env) -> None:
    """FEATURE_PIPELINE_FAULTS=fail-run: the run fails after all its writes; none of them may survive."""
    env.apply(
        [
            env.feed.event("s-1", "signals.task.synced", "u-1", NOW - timedelta(hours=5)),
            env.feed.dead_letter("SIGNALS", 9),
        ]
    )
    before = env.snapshot()
    batch = [
        env.feed.event("s-2", "signals.task.synced", "u-1", NOW - timedelta(hours=1)),
        env.feed.event("f-1", "feedback.recommendation.shown", "u-2", NOW - timedelta(hours=1)),
        env.feed.dead_letter("FEEDBACK", 3),
    ]
    batch_id = env.stage(batch)
    with pytest.raises(faults.InjectedFault):
        env.store.apply_batch(env.staging.path(batch_id), batch_id, before_commit=FAIL)
    assert env.snapshot() == before

    result = env.store.apply_batch(env.staging.path(batch_id), batch_id)
    assert (result.new_in("SIGNALS"), result.new_in("FEEDBACK"), result.dead_letters_inserted) == (1, 1, 1)
    assert env.count("ingested_batches") == 2


def test_fail_before_commit_on_a_fresh_store_stores_nothing(env: Env) -> None:
    """The very first batch failing must leave empty tables, not a half-written store."""
    batch_id = env.stage([env.feed.event("s-1", "signals.task.completed", "u-1", NOW)])
    with pytest.raises(faults.InjectedFault):
        env.store.apply_batch(env.staging.path(batch_id), batch_id, before_commit=FAIL)
    assert {t: len(rows) for t, rows in env.snapshot().items()} == dict.fromkeys(TABLES, 0)


def test_one_out_of_range_event_does_not_fail_the_batch(env: Env) -> None:
    """A single event the contract accepted must not make every run of its batch fail (and dead-letter the rest)."""
    huge = {"provider": "todoist", "tasks_total": 2**63, "tasks_completed": 0}
    result = env.apply(
        [
            env.feed.event("s-1", "signals.task.completed", "u-1", NOW - timedelta(hours=1)),
            env.feed.event("s-2", "signals.task.synced", "u-2", NOW - timedelta(hours=1), huge),
        ]
    )
    assert result.new_in("SIGNALS") >= 1


# -- feature semantics ----------------------------------------------------------------------


def test_feature_semantics_by_hand(env: Env) -> None:
    """Windows by occurred_at, the newest task.synced wins, acceptance = accepted/shown, future events ignored."""
    f = env.feed

    def ago(**kw: float) -> datetime:
        return NOW - timedelta(**kw)

    # The newest task.synced arrives first; an older one arrives in a later batch and must not win.
    env.apply(
        [
            f.event("a-s1", "signals.task.synced", "alice", ago(hours=1), data_for("signals.task.synced", 7)),
            f.event("a-s3", "signals.task.completed", "alice", ago(hours=23)),
            f.event(
                "a-fut", "signals.task.synced", "alice", NOW + timedelta(days=2), data_for("signals.task.synced", 90)
            ),
            f.event("b-a1", "feedback.recommendation.accepted", "bob", ago(hours=1)),
            f.event("c-fut", "signals.task.completed", "carol", NOW + timedelta(days=1)),
        ]
    )
    second = env.apply(
        [
            f.event("a-s2", "signals.task.synced", "alice", ago(hours=30), data_for("signals.task.synced", 1)),
            f.event("a-s4", "signals.task.completed", "alice", ago(days=3)),
            f.event("a-s5", "signals.task.completed", "alice", ago(days=8)),
            *(
                f.event(f"a-sh{h}", "feedback.recommendation.shown", "alice", ago(hours=h))
                for h in (1, 2 * 24, 5 * 24, 6 * 24, 9 * 24)
            ),
            f.event("a-ac1", "feedback.recommendation.accepted", "alice", ago(days=1)),
            f.event("a-ac2", "feedback.recommendation.accepted", "alice", ago(days=10)),
            f.event("a-ac3", "feedback.recommendation.accepted", "alice", NOW + timedelta(hours=1)),
            f.event("a-di1", "feedback.recommendation.dismissed", "alice", ago(days=2)),
        ]
    )
    rows = assert_rows_match_reference(env)
    alice = rows["alice"]
    assert alice["updated_at"] == second.committed_at
    assert {k: v for k, v in alice.items() if k not in ("user_id", "updated_at")} == {
        "signal_count_total": 5,  # a-s1..a-s5; the future a-fut is not counted
        "signal_count_24h": 2,  # a-s1 (1 h), a-s3 (23 h)
        "signal_count_7d": 4,  # + a-s2 (30 h), a-s4 (3 d); a-s5 (8 d) is outside
        "task_synced_count_7d": 2,  # a-s1, a-s2
        "latest_tasks_total": 10,  # from a-s1 (newest by occurred_at), not a-s2 (arrived later) nor a-fut
        "latest_tasks_completed": 7,
        "rec_shown_7d": 4,  # 1 h, 2 d, 5 d, 6 d; 9 d is outside
        "rec_accepted_7d": 1,  # 1 d; 10 d is outside, the future one is not counted
        "rec_dismissed_7d": 1,
        "rec_acceptance_rate_7d": 0.25,
        "last_signal_at": ago(hours=1),
        "last_feedback_at": ago(hours=1),
    }

    bob = rows["bob"]
    assert bob["rec_accepted_7d"] == 1
    assert bob["rec_shown_7d"] == 0
    assert bob["rec_acceptance_rate_7d"] is None  # nothing shown: no rate, not a division by zero
    assert bob["signal_count_total"] == 0
    assert bob["latest_tasks_total"] is None
    assert bob["last_signal_at"] is None
    assert bob["last_feedback_at"] == ago(hours=1)

    carol = rows.get("carol")
    assert carol is None or carol["signal_count_total"] == 0


def test_window_boundaries(env: Env) -> None:
    """Windows are (as_of - window, as_of]: exactly 24 h old is out, exactly as_of is in, later is out."""
    as_of = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    f = env.feed
    env.apply(
        [
            f.event("e-now", "signals.task.completed", "u", as_of),
            f.event("e-24h", "signals.task.completed", "u", as_of - timedelta(hours=24)),
            f.event("e-24h-", "signals.task.completed", "u", as_of - timedelta(hours=24) + timedelta(microseconds=1)),
            f.event("e-7d", "signals.task.completed", "u", as_of - timedelta(days=7)),
            f.event("e-later", "signals.task.completed", "u", as_of + timedelta(microseconds=1)),
            f.event("r-7d", "feedback.recommendation.shown", "u", as_of - timedelta(days=7)),
            f.event("r-in", "feedback.recommendation.shown", "u", as_of - timedelta(days=7) + timedelta(seconds=1)),
            f.event("r-acc", "feedback.recommendation.accepted", "u", as_of),
        ]
    )
    row = env.reference(as_of)["u"]
    assert row["signal_count_total"] == 4
    assert row["signal_count_24h"] == 2
    assert row["signal_count_7d"] == 3
    assert row["rec_shown_7d"] == 1
    assert row["rec_acceptance_rate_7d"] == 1.0
    assert row["last_signal_at"] == as_of
    assert row["updated_at"] == as_of


def test_latest_tasks_tie_on_occurred_at_is_deterministic(env: Env) -> None:
    """Two task.synced at the same instant: the choice must not depend on arrival order."""
    when = NOW - timedelta(hours=1)
    env.apply([env.feed.event("b", "signals.task.synced", "u", when, data_for("signals.task.synced", 2))])
    env.apply([env.feed.event("a", "signals.task.synced", "u", when, data_for("signals.task.synced", 1))])
    other = make_env(env.store.path.parent / "other")
    other.apply([other.feed.event("a", "signals.task.synced", "u", when, data_for("signals.task.synced", 1))])
    other.apply([other.feed.event("b", "signals.task.synced", "u", when, data_for("signals.task.synced", 2))])
    mine, theirs = env.features()["u"], other.features()["u"]
    assert mine["latest_tasks_total"] == theirs["latest_tasks_total"]
    assert mine["latest_tasks_completed"] == theirs["latest_tasks_completed"]


def test_untouched_users_keep_their_row_and_still_match(env: Env) -> None:
    """Only the users of a batch are recomputed; the others keep an older updated_at that is still consistent."""
    first = env.apply([env.feed.event("a", "signals.task.completed", "u-1", NOW - timedelta(hours=1))])
    second = env.apply([env.feed.event("b", "signals.task.completed", "u-2", NOW - timedelta(hours=1))])
    rows = assert_rows_match_reference(env)
    assert rows["u-1"]["updated_at"] == first.committed_at
    assert rows["u-2"]["updated_at"] == second.committed_at
    refresh, health = env.store.recompute_all()
    assert refresh.rows_written == 2 and refresh.rebuilt and health.inconsistent_users == []
    assert_rows_match_reference(env)


# -- property -------------------------------------------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(events=st.lists(EVENT, min_size=1, max_size=15), draw=st.data())
def test_any_batching_with_duplicates_gives_the_reference_features(
    events: list[tuple[str, str, int, int]], draw: st.DataObject
) -> None:
    """Whatever NATS does (redelivery, duplicates, reordering, batch boundaries), the store ends up exact."""
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as root:
        env = make_env(Path(root))
        deliveries, cuts = deliveries_for(env.feed, events, draw, now)

        results = [env.apply(deliveries[a:b]) for a, b in zip([0, *cuts], [*cuts, len(deliveries)], strict=True)]

        distinct = {f"evt-{i}" for i in range(len(events))}
        assert sum(r.new_in("SIGNALS") + r.new_in("FEEDBACK") for r in results) == len(distinct)
        assert sum(r.duplicates_absorbed for r in results) == len(deliveries) - len(distinct)
        with env.con() as con:
            stored = [
                r[0]
                for r in con.execute(
                    "SELECT event_id FROM signal_events UNION ALL SELECT event_id FROM feedback_events"
                ).fetchall()
            ]
        assert sorted(stored) == sorted(distinct)

        rows = assert_rows_match_reference(env)
        assert set(rows) == {user for user, *_ in events}
        for user, row in rows.items():
            mine = [e for e in events if e[0] == user]
            assert row["signal_count_total"] == sum(1 for e in mine if e[1].startswith("signals."))


def test_a_store_made_before_event_index_gets_its_ids_indexed_when_opened(env: Env) -> None:
    """Stores written before event_index existed: the first writer to open one indexes its ids, so a
    redelivery of an old event is still absorbed."""
    when = NOW - timedelta(hours=1)
    old = env.feed.event("old-1", "signals.task.completed", "u-1", when)
    env.apply([old])
    with env.con() as con:
        con.execute("DELETE FROM event_index")  # as the store was before
    again = env.feed.event("old-1", "signals.task.completed", "u-1", when, seq=old.stream_seq)
    result = env.apply([again])
    assert result.duplicates_absorbed == 1 and env.count("signal_events") == 1
    assert assert_rows_match_reference(env)["u-1"]["signal_count_total"] == 1


def test_the_first_day_follows_the_earliest_stored_event_and_never_moves_later(env: Env) -> None:
    """No event stored, no first day (a fresh install offers no snapshot day); then the earliest stored
    event's day, moved earlier by a batch with an older event, never later; a store made before the file
    existed gets it from its events when a writer opens it. FEATURE_PIPELINE_SNAPSHOT_START overrides it."""
    path = env.store.path
    env.store.connect().close()
    assert read_first_day(path) is None, "a store without events"
    env.apply([env.feed.event("e-1", "signals.task.completed", "u-1", NOW - timedelta(days=40))])
    assert read_first_day(path) == (NOW - timedelta(days=40)).date().isoformat()
    env.apply([env.feed.event("e-2", "signals.task.completed", "u-1", NOW)])
    assert read_first_day(path) == (NOW - timedelta(days=40)).date().isoformat(), "never later"
    env.apply([env.feed.event("e-3", "signals.task.completed", "u-1", NOW - timedelta(days=400))])
    assert read_first_day(path) == (NOW - timedelta(days=400)).date().isoformat(), "older events move it"

    first_day_file(path).unlink()  # as a store made before the file existed
    env.store.connect().close()
    assert read_first_day(path) == (NOW - timedelta(days=400)).date().isoformat()

    configured = changed(settings_for(path.parent, "nats://127.0.0.1:4222"), feature_store_path=path)
    assert first_day(configured)[0] == (NOW - timedelta(days=400)).date()
    assert first_day(changed(configured, snapshot_start="2026-02-03"))[0] == date(2026, 2, 3)
    assert first_day(changed(configured, feature_store_path=path.parent / "elsewhere.duckdb"))[0] is None


def test_the_whole_history_comparison_runs_when_due_and_sees_a_damaged_row(env: Env) -> None:
    """The comparison with the reference reads every stored event, so batches make it at most every
    `consistency_every` seconds and report the last one in between; when due, it finds a damaged row."""
    first = env.apply([env.feed.event("c-1", "signals.task.completed", "u-1", NOW)], consistency_every=300)
    with env.con() as con:
        con.execute("UPDATE user_features SET signal_count_total = 99 WHERE user_id = 'u-1'")
    later = env.apply([env.feed.event("c-2", "signals.task.completed", "u-2", NOW)], consistency_every=300)
    assert later.health.consistency_checked_at == first.health.consistency_checked_at
    assert later.health.inconsistent_users == []  # the last comparison, made before the damage
    due = env.apply([env.feed.event("c-3", "signals.task.completed", "u-3", NOW)], consistency_every=0)
    assert due.health.consistency_checked_at > first.health.consistency_checked_at
    assert due.health.inconsistent_users == ["u-1"]
