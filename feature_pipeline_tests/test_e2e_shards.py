"""Two shards end to end, through the real `dagster-daemon` and a real nats-server: one daemon start, four phases.

1. shard 1's store is down (a folder stands where its file goes): its runs fail outside their messages and are
   retried, its users wait, shard 0 goes on storing; nothing is dead-lettered or redelivered; `health` names it;
2. it comes back: every event is stored once, each in its user's shard, and every message is acked;
3. poison and a message that breaks its batch: the batch is split until that message is alone, which is
   redelivered until NATS_MAX_DELIVER and dead-lettered with the run's reason; its batch-mates are stored;
4. every read answers as one store would: the streamed rows equal a recomputation, the online store, the
   point-in-time join at each row's time (scatter-gather), the daily snapshots (a backfill per shard), and a
   training set of one store fed the same events by replaying the streams.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_pipeline import shards
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.ingest.replay import ReplayRange, replay
from feature_pipeline.read.training import training_set
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.features import compute_features, day_end
from feature_pipeline.testing import Pipeline, consumer_states, query, run, stream_messages, wait_for
from feature_pipeline_tests.helpers import publish

pytestmark = pytest.mark.e2e

USERS = [f"u-{i}" for i in range(24)] + ["alice", "bob"]
FEATURES = ("signal_count_total", "latest_tasks_total", "rec_shown_7d", "last_feedback_at")


def _synced(event_id: str, user: str, at: datetime, total: int = 3) -> tuple[str, bytes]:
    data = {"provider": "todoist", "tasks_total": total, "tasks_completed": 1}
    return "signals.task.synced", make_envelope(event_id, "task.synced", user, at, data)


def _shown(event_id: str, user: str, at: datetime) -> tuple[str, bytes]:
    data = {"recommendation_id": "r-1", "item_id": "i-1"}
    return "feedback.recommendation.shown", make_envelope(event_id, "recommendation.shown", user, at, data)


def _events(tag: str, users: list[str], now: datetime) -> list[tuple[str, bytes]]:
    """Two events a user, one today and one a few days back (snapshot days have history)."""
    out = []
    for n, user in enumerate(users):
        out.append(_synced(f"{tag}-{user}-s", user, now - timedelta(minutes=n), total=n))
        out.append(_shown(f"{tag}-{user}-f", user, now - timedelta(days=1 + n % 3, hours=1)))
    return out


def _ids(events: list[tuple[str, bytes]]) -> list[str]:
    return [json.loads(body)["id"] for _, body in events]


def _stored(p: Pipeline) -> list[tuple[str, str, int]]:
    """(event id, user, shard) of every stored event."""
    sql = "SELECT event_id, user_id FROM signal_events UNION ALL SELECT event_id, user_id FROM feedback_events"
    return [(i, u, k) for k, db in enumerate(p.stores) for i, u in _q(db, sql)]


def _q(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of one shard's store; none while a folder stands in its place (phase 1)."""
    return query(db, sql) if db.is_file() else []


def _rows(p: Pipeline) -> dict[str, dict[str, Any]]:
    cols = ", ".join(("user_id", "updated_at", *FEATURES))
    out = {}
    for db in p.stores:
        for row in _q(db, f"SELECT {cols} FROM user_features"):
            out[row[0]] = dict(zip(("user_id", "updated_at", *FEATURES), row, strict=True))
    return out


def _ingest_runs(p: Pipeline, shard: int) -> list[dg.RunRecord]:
    with p.instance() as inst:
        filters = dg.RunsFilter(job_name="ingest", tags={shards.SHARD_TAG: str(shard)})
        return list(inst.get_run_records(filters=filters))


def test_two_shards_under_the_daemon_outage_poison_bisect_and_every_read_as_one_store(
    make_pipeline: Any, tmp_path: Path
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    p = make_pipeline(
        {
            "FEATURE_PIPELINE_SHARDS": "2",
            "FEATURE_PIPELINE_FAULTS": "fail-marked",
            "NATS_MAX_DELIVER": "3",
            "FEATURE_PIPELINE_CONSISTENCY_EVERY_SECONDS": "0",
            "FEATURE_PIPELINE_SNAPSHOT_START": (now - timedelta(days=10)).date().isoformat(),
        }
    )
    by_shard = {k: [u for u in USERS if shards.shard_of(u, 2) == k] for k in (0, 1)}
    assert by_shard[0] and by_shard[1]

    # 1. shard 1's store is down.
    p.stores[1].mkdir(parents=True)
    first = _events("a", USERS, now)
    run(publish(p.nats.url, first))
    shard0 = {i for i in _ids(first) if i.split("-", 1)[1].rsplit("-", 1)[0] in by_shard[0]}
    wait_for(lambda: shard0 <= {i for i, _, _ in _stored(p)}, 90, "shard 0's events stored while shard 1 is down")
    wait_for(lambda: len(_failed(p, 1)) >= 2, 90, "shard 1's batch to fail and be retried")
    during = _events("b", by_shard[0], now)
    run(publish(p.nats.url, during))
    wait_for(lambda: set(_ids(during)) <= {i for i, _, _ in _stored(p)}, 90, "shard 0 to go on storing")
    assert not _stored(p) or {k for _, _, k in _stored(p)} == {0}
    health = wait_for(lambda: (h := p.cli("health", "--json")).returncode == 1 and "of shard 1" in h.stdout and h,
                      30, "health to name shard 1's batch")  # fmt: skip
    assert any(str(p.stores[1]) in r for r in json.loads(health.stdout)["retrying"])
    assert not run(stream_messages(p.nats.url, "DEADLETTER")), "an outage dead-letters nothing"

    # 2. it comes back.
    p.stores[1].rmdir()
    published = _ids(first) + _ids(during)
    wait_for(lambda: sorted(i for i, _, _ in _stored(p)) == sorted(published) and p.settled(), 150,
             "every event stored once")  # fmt: skip
    assert all(shards.shard_of(u, 2) == k for _, u, k in _stored(p)), "each user in its own shard"
    consumers = run(consumer_states(p.nats.url, p.prefix))
    assert sum(c.num_redelivered or 0 for c in consumers.values()) == 0, "no delivery spent by the outage"
    _assert_runs_of_shards_overlap_and_runs_of_a_shard_do_not(p)

    # 3. poison, and a message that breaks its batch (fail-marked), on shard 1's user alice.
    mates = [_synced(f"c-{u}", u, now) for u in USERS]
    run(publish(p.nats.url, [*mates[:5], ("signals.task.synced", b"\xff not json"),
                             _synced("fail-alice", "alice", now), *mates[5:]]))  # fmt: skip
    wait_for(lambda: len(_dead(p)) == 2 and p.settled(), 240, "the poison and the failing message dead-lettered")
    reasons = sorted(r for r, _ in _dead(p))
    assert reasons[0].startswith("gave up after 3 deliveries") and "fail-alice breaks this batch" in reasons[0]
    assert reasons[1].startswith("not valid JSON")
    shard_of_reason = {r.split(" ")[0]: k for r, k in _dead(p)}
    assert shard_of_reason == {"gave": 1, "not": 0}, "each recorded in its body's user's shard (none: shard 0)"
    stored = [i for i, _, _ in _stored(p)]
    assert sorted(stored) == sorted(published + _ids(mates)) and len(set(stored)) == len(stored)
    assert any("split batch" in m for m in _tick_lines(p)), "shard 1's batch was bisected"

    # 4. every read, as one store's.
    rows = _rows(p)
    assert set(rows) == set(USERS)
    for k, db in enumerate(p.stores):
        store = FeatureStore(db, shard=k, shards=2, base=p.db)
        con = store.connect(read_only=True)
        try:
            for user, row in rows.items():
                if shards.shard_of(user, 2) == k:
                    ref = compute_features(con, store.registry, row["updated_at"], [user])[user]
                    assert {f: ref[f] for f in FEATURES} == {f: row[f] for f in FEATURES}, user
        finally:
            con.close()
    for user, row in rows.items():
        online = json.loads(p.cli("features", user).stdout)
        assert online["signal_count_total"] == row["signal_count_total"], user
        assert online["latest_tasks_total"] == row["latest_tasks_total"], user
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"user_id": list(rows), "ts": [r["updated_at"] for r in rows.values()]}), labels)
    out = p.cli("training-set", str(labels), "--out", str(tmp_path / "pit.parquet"))
    assert out.returncode == 0, out.stderr
    for got in pq.read_table(tmp_path / "pit.parquet").to_pylist():
        assert {f: got[f] for f in FEATURES} == {f: rows[got["user_id"]][f] for f in FEATURES}, got["user_id"]

    _assert_snapshots_equal_point_in_time(p, now, tmp_path)
    _assert_one_store_fed_the_same_events_answers_the_same(p, now, tmp_path)


def _failed(p: Pipeline, shard: int) -> list[dg.RunRecord]:
    return [r for r in _ingest_runs(p, shard) if r.dagster_run.status == dg.DagsterRunStatus.FAILURE]


def _dead(p: Pipeline) -> list[tuple[str, int]]:
    return [(r, k) for k, db in enumerate(p.stores) for (r,) in _q(db, "SELECT reason FROM dead_letters")]


def _tick_lines(p: Pipeline) -> list[str]:
    return p.daemon_log.read_text(errors="replace").splitlines()


def _assert_runs_of_shards_overlap_and_runs_of_a_shard_do_not(p: Pipeline) -> None:
    spans = {k: [(r.start_time, r.end_time) for r in _ingest_runs(p, k) if r.end_time] for k in (0, 1)}
    for k, runs in spans.items():
        ordered = sorted(runs)
        assert all(a[1] <= b[0] + 0.5 for a, b in itertools.pairwise(ordered)), f"shard {k} ran two at once"
    assert any(a0 < b1 and a1 < b0 for a0, a1 in spans[0] for b0, b1 in spans[1]), "the shards' runs never overlapped"


def _assert_snapshots_equal_point_in_time(p: Pipeline, now: datetime, tmp_path: Path) -> None:
    """A backfill of two days, one per shard (feature-pipeline backfill-snapshots): the union of the shards'
    snapshots equals the point-in-time join at each day's end."""
    days = [(now - timedelta(days=k)).date() for k in (2, 1)]
    out = p.cli("backfill-snapshots", days[0].isoformat(), days[1].isoformat())
    assert out.returncode == 0 and out.stdout.count("of shard") == 2, out.stdout + out.stderr

    def done() -> bool:
        with p.instance() as inst:
            backfills = inst.get_backfills()
        assert all(b.status.value not in ("FAILED", "CANCELED") for b in backfills), backfills
        return len(backfills) == 2 and all(b.status.value == "COMPLETED_SUCCESS" for b in backfills)

    wait_for(done, 180, "the snapshot backfills to complete")
    sql = f"SELECT snapshot_date, user_id, {', '.join(FEATURES)} FROM user_feature_snapshots"
    snap = {(r[0], r[1]): r[2:] for r in p.query(sql)}
    labels = tmp_path / "days.parquet"
    users = sorted(USERS)
    pq.write_table(pa.table({"user_id": users * 2, "ts": [day_end(d) for d in days for _ in users]}), labels)
    out = p.cli("training-set", str(labels), "--out", str(tmp_path / "days-pit.parquet"))
    assert out.returncode == 0, out.stderr
    pit = pq.read_table(tmp_path / "days-pit.parquet").to_pylist()
    for row, day in zip(pit, [d for d in days for _ in users], strict=True):
        if row["signal_count_total"] or row["rec_shown_7d"]:  # a user with history by then has a snapshot row
            assert snap[(day, row["user_id"])] == tuple(row[f] for f in FEATURES), (day, row["user_id"])
    assert {d for d, _ in snap} == set(days), "both days snapshotted"


def _assert_one_store_fed_the_same_events_answers_the_same(p: Pipeline, now: datetime, tmp_path: Path) -> None:
    """One store fed the streams' messages (a replay of each) gives the training set the two shards give."""
    one = FeatureStore(tmp_path / "one.duckdb")
    for stream in ("SIGNALS", "FEEDBACK", "DEADLETTER"):
        replay(p.nats.url, None, one, ReplayRange(stream), log=lambda _: None)
    ts = now + timedelta(seconds=1)
    # alice's fail-marked event is a drill the runs fail on and the replay stores: her rows differ by design.
    users = [u for u in USERS if u != "alice"] + ["nobody"]
    labels = pa.table({"user_id": users, "ts": [ts] * len(users), "label": list(range(len(users)))})
    sharded = [FeatureStore(db, shard=k, shards=2, base=p.db) for k, db in enumerate(p.stores)]
    assert training_set(labels, store=sharded).to_pylist() == training_set(labels, store=one).to_pylist()
    dead_one = sorted(r for (r,) in _q(one.path, "SELECT reason FROM dead_letters"))
    assert dead_one == sorted(r for r, _ in _dead(p)), "the same dead letters"
