"""Shards: users split across stores by a stable hash, each store with its own staging and single writer.

Against a real nats-server and real DuckDB files: the sensor's tick splits what it pulls by shard, a busy
shard's part waits parked and is merged into one batch when the shard is free, an outage of one shard's store
holds back only its users and spends no delivery, two shards answer every read as one store fed the same
events, and a changed number of shards is refused in words until `reshard` has moved the users.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from feature_pipeline import contract, shards
from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.local import LocalNats
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.ingest import layout
from feature_pipeline.ingest.shared_staging import open_staging
from feature_pipeline.ingest.staging import FolderStaging
from feature_pipeline.read.serving import read_export
from feature_pipeline.read.training import training_set
from feature_pipeline.report import build
from feature_pipeline.settings import Settings
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.testing import BIN, REPO, query, run
from feature_pipeline_tests.helpers import (
    Feed,
    Lifecycle,
    changed,
    publish,
    redeliveries,
    settings_for,
    stored_ids,
    synced,
)

# Users of both shards of two: crc32 mod 2 sends u-1, u-2, u-42 to shard 0 and alice to shard 1.
USERS = [f"u-{i}" for i in range(40)]


@pytest.fixture
def two(tmp_path: Path, nats_server: LocalNats) -> Settings:
    return settings_for(tmp_path, nats_server.url, shards=2)


def _ids_in(settings: Settings, shard: int) -> list[tuple[str, str]]:
    """(event id, user) of every event stored in one shard's store."""
    path = Path(shards.for_shard(settings, shard).feature_store_path)
    sql = "SELECT event_id, user_id FROM signal_events UNION ALL SELECT event_id, user_id FROM feedback_events"
    return [(r[0], r[1]) for r in query(path, sql)]


def _publish(settings: Settings, prefix: str, users: list[str]) -> list[str]:
    events = [synced(f"{prefix}-{u}-{n}", u) for u in users for n in range(3)]
    run(publish(settings.nats_url, events))
    return [json.loads(body)["id"] for _, body in events]


# -- the map ------------------------------------------------------------------------------------------------


def test_a_user_maps_to_the_same_shard_on_every_host_and_version() -> None:
    """crc32 of the UTF-8 bytes, mod N: these values are fixed by the standard, not by this process."""
    assert [shards.shard_of(u, 2) for u in ("u-42", "u-1", "alice", "ünï©ødé 用户")] == [0, 0, 1, 1]
    assert [shards.shard_of(u, 3) for u in ("u-42", "alice", "ünï©ødé 用户")] == [0, 2, 2]
    assert shards.shard_of("anything", 1) == 0
    code = "from feature_pipeline.shards import shard_of; print(shard_of('alice', 7))"
    other = subprocess.run([str(BIN / "python"), "-c", code], env={**os.environ, "PYTHONHASHSEED": "123"},
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert int(other.stdout) == shards.shard_of("alice", 7), "another process, another hash seed: the same shard"


def test_a_message_is_routed_by_the_user_id_the_contract_reads() -> None:
    """The router reads user_id as the models do (the last of duplicate keys, escapes decoded); bodies without
    a string user_id, poison mostly, go to shard 0."""
    at = datetime(2026, 11, 27, tzinfo=UTC)
    bodies = [
        make_envelope("e-1", "task.completed", "alice", at, {"task_id": "t"}),
        b'{"id":"e-2","type":"task.completed","user_id":"u-1","user_id":"alice","occurred_at":"2026-11-27T00:00:00Z",'
        b'"schema_version":1,"data":{"task_id":"t"}}',
        b'{"id":"e-3","type":"task.completed","user_id":"\\u00fcn\\u00ef","occurred_at":"2026-11-27T00:00:00Z",'
        b'"schema_version":1,"data":{"task_id":"t"}}',
    ]
    for body in bodies:
        stored = contract.validate("signals.task.completed", body).user_id
        assert shards.routing_user(body) == stored
        assert shards.shard_of_body(body, 2) == shards.shard_of(stored, 2)
    assert shards.routing_user(b'{"user_id": "alice", "data": {"x": NaN}}') == "alice"  # the models decide NaN
    for poison in (b"not json", b'{"user_id": 42}', b'["alice"]', b"", b'{"id": "e"}'):
        assert shards.routing_user(poison) is None and shards.shard_of_body(poison, 2) == 0


def test_each_shard_keeps_its_files_beside_the_store_with_its_layout_in_the_name(tmp_path: Path) -> None:
    cfg = settings_for(tmp_path, "nats://127.0.0.1:4222", shards=2)
    one = shards.for_shard(cfg, 1)
    assert one.feature_store_path == str(tmp_path / "store.shard-1-of-2.duckdb")
    assert one.serving_path == str(tmp_path / "serving" / "user_features.shard-1-of-2.parquet")
    assert one.archive_path == str(tmp_path / "archive" / "shard-1-of-2")
    assert shards.staging_dir(cfg.staging_dir, 1, 2) == tmp_path / "staging" / "shard-1-of-2"
    single = settings_for(tmp_path, "nats://127.0.0.1:4222")
    assert shards.for_shard(single, 0) == single, "one shard is the layout the pipeline always had"
    with pytest.raises(ValueError, match=r"shards 0\.\.1"):
        shards.for_shard(cfg, 2)


# -- the sensor's tick ---------------------------------------------------------------------------------------


def test_a_tick_splits_its_pull_into_one_batch_per_shard_and_each_user_is_stored_once_in_its_own(
    two: Settings,
) -> None:
    published = _publish(two, "e", USERS)
    life = Lifecycle(two)
    report = life.tick()
    assert sorted(report.shard_of[b] for b in report.to_request) == [0, 1], report.summary()
    for batch_id in report.to_request:
        shard = report.shard_of[batch_id]
        with open_staging(two, shard) as staging:
            bodies = [r["body"] for rows in staging.iter_deliveries(batch_id) for r in rows]
        assert {shards.shard_of_body(b, 2) for b in bodies} == {shard}, "a batch holds its shard's users only"
    life.drain()
    for shard in (0, 1):
        assert {shards.shard_of(u, 2) for _, u in _ids_in(two, shard)} == {shard}
    every = [i for shard in (0, 1) for i, _ in _ids_in(two, shard)]
    assert sorted(every) == sorted(published), "nothing lost, nothing stored twice"
    assert redeliveries(two) == 0


def test_a_busy_shard_parks_its_part_and_catches_up_in_one_merged_batch(two: Settings) -> None:
    """Shard 1's run waits to start while shard 0 goes on: shard 1's part of each new pull is staged parked (no
    run), kept alive, and merged into one batch once its run has succeeded."""
    life = Lifecycle(two)
    first = _publish(two, "a", USERS)
    report = life.tick()
    batches = {report.shard_of[b]: b for b in report.to_request}
    life.runs.queue(batches[1])  # shard 1's run is queued: its shard is busy
    assert life.execute(batches[0])
    parked = []
    for round_ in ("b", "c"):
        _publish(two, round_, USERS)
        report = life.tick()
        assert [report.shard_of[b] for b in report.to_request] == [0], report.summary()
        parked += [m for m in report.staged if m.parked]
        assert len(parked) == len({m.batch_id for m in parked}) and report.shard_of[parked[-1].batch_id] == 1
        assert "parked" in report.summary()
        assert life.execute(report.to_request[0])
    assert life.execute(batches[1])  # shard 1 is free again
    report = life.tick()
    assert report.merged and "merged 2 parked batch(es) of shard 1 into 1" in report.merged[0], report.summary()
    (merged,) = [b for b in report.to_request if report.shard_of[b] == 1]
    with open_staging(two, 1) as staging:
        assert {m.batch_id for m in staging.batches()} == {merged}, "the parked batches are gone"
        assert staging.manifest(merged).size == sum(m.size for m in parked)  # type: ignore[union-attr]
    life.drain()
    every = sorted(i for shard in (0, 1) for i, _ in _ids_in(two, shard))
    assert len(every) == 3 * len(first) and len(set(every)) == len(every)
    assert redeliveries(two) == 0, "parked messages are kept alive, never redelivered"


def test_a_shard_whose_store_is_down_holds_back_only_its_users_and_spends_no_delivery(two: Settings) -> None:
    """Shard 1's file cannot be opened (a folder stands in its place): its runs fail outside their messages and
    are retried, its new messages wait parked; shard 0 keeps storing. Once the store is back, every event is
    stored once and nothing was dead-lettered."""
    down = Path(shards.for_shard(two, 1).feature_store_path)
    down.mkdir(parents=True)
    life = Lifecycle(two)
    published = _publish(two, "a", USERS)
    for round_ in ("b", "c", "d"):
        report = life.tick()
        for batch_id in report.to_request:
            life.execute(batch_id, attempt=report.attempts.get(batch_id, 0))
        published += _publish(two, round_, USERS)
    report = life.tick()
    assert any("of shard 1" in r and str(down) in r for r in report.retrying), report.summary()
    shard0 = [u for u in USERS if shards.shard_of(u, 2) == 0]
    stored0 = {i for i, _ in _ids_in(two, 0)}
    assert {i for i in published[: 3 * len(USERS)] if i.split("-", 2)[2].rsplit("-", 1)[0] in shard0} <= stored0
    assert any(i.startswith("c-") for i in stored0), "shard 0 went on storing during the outage"
    assert redeliveries(two) == 0 and not query(Path(two.feature_store_path), "SELECT 1")

    down.rmdir()
    life.drain(timeout=90)
    every = sorted(i for shard in (0, 1) for i, _ in _ids_in(two, shard))
    assert every == sorted(published), "every event stored once"
    for shard in (0, 1):
        path = Path(shards.for_shard(two, shard).feature_store_path)
        assert query(path, "SELECT count(*) FROM dead_letters") == [(0,)], "an outage dead-letters nothing"


def test_an_event_in_the_wrong_shards_batch_is_poison_not_stored(tmp_path: Path) -> None:
    """The guard behind the router: a store never takes a user that is not its shard's."""
    feed = Feed()
    store = FeatureStore(tmp_path / "s.shard-0-of-2.duckdb", shard=0, shards=2, base=tmp_path / "s.duckdb")
    staging = FolderStaging(tmp_path / "staging")
    at = datetime.now(UTC)
    batch = staging.stage([feed.event("e-1", "signals.task.completed", "u-1", at),
                           feed.event("e-2", "signals.task.completed", "alice", at)])  # fmt: skip
    result = store.apply_batch(staging.path(batch.batch_id), batch.batch_id)
    assert result.inserted == 1
    ((delivery, reason),) = result.poison
    assert json.loads(delivery.data)["id"] == "e-2" and "belongs to shard 1 of 2" in reason


# -- every read as one store's ------------------------------------------------------------------------------


def _history(feed: Feed, end: datetime) -> list[list[Any]]:
    """Three batches of events of 30 users over ten days, with a repeat, poison and a dead-letter copy."""
    users = [f"u-{i}" for i in range(25)] + ["alice", "bob", "ünï©ødé 用户", "x" * 300, "007"]
    subjects = ["signals.task.synced", "signals.task.completed", "feedback.recommendation.shown"]
    events = [
        feed.event(f"evt-{n}", subjects[n % 3], users[n % len(users)], end - timedelta(hours=7 * n % 240))
        for n in range(240)
    ]
    poison = dataclasses.replace(feed.event("evt-p", "signals.task.completed", "bob", end), data=b'{"user_id": "bob"}')
    repeat = events[5]
    return [events[:100], [*events[100:180], poison, repeat], [*events[180:], feed.dead_letter("SIGNALS", 3)]]


def _apply(stores: list[FeatureStore], staging: FolderStaging, batches: list[list[Any]], end: datetime) -> None:
    """Each batch split by shard, each shard's part stored at the batch's clock (an empty part moves the clock)."""
    for n, batch in enumerate(batches):
        now = end - timedelta(hours=2 * (len(batches) - n))
        for store in stores:
            part = [d for d in batch if shards.shard_of_body(d.data, store.shards) == store.shard]
            if part:
                staged = staging.stage(part)
                store.apply_batch(staging.path(staged.batch_id), staged.batch_id, now=now)
            else:
                store.advance(now=now)


def test_two_shards_answer_every_read_as_one_store_fed_the_same_events(tmp_path: Path) -> None:
    """The oracle: features, the training set (scatter-gather), snapshots, the export, a rebuild and the dead
    letters of two shards equal one store's."""
    end = datetime.now(UTC).replace(microsecond=0)
    batches = _history(Feed(), end)
    one_cfg = settings_for(tmp_path / "one", "nats://127.0.0.1:4222")
    two_cfg = settings_for(tmp_path / "two", "nats://127.0.0.1:4222", shards=2)
    one = [FeatureStore.from_settings(one_cfg)]
    two = [FeatureStore.from_settings(two_cfg, k) for k in range(2)]
    _apply(one, FolderStaging(tmp_path / "stage-one"), batches, end)
    _apply(two, FolderStaging(tmp_path / "stage-two"), batches, end)

    def rows(stores: list[FeatureStore], sql: str) -> list[tuple[Any, ...]]:
        return sorted((r for s in stores for r in query(s.path, sql)), key=repr)

    for table in ("user_features", "dead_letters", "signal_events", "feedback_events"):
        exclude = "EXCLUDE (batch_id, ingested_at)" if table.endswith("_events") else ""
        exclude = "EXCLUDE (recorded_at, batch_id)" if table == "dead_letters" else exclude
        assert rows(two, f"SELECT * {exclude} FROM {table}") == rows(one, f"SELECT * {exclude} FROM {table}"), table
    assert all(rows([s], "SELECT count(*) FROM user_features")[0][0] > 0 for s in two), "both shards hold users"

    users = [*sorted({r[0] for r in rows(one, "SELECT user_id FROM user_features")}), "nobody"]
    labels = pa.table({
        "user_id": [u for u in users for _ in range(3)],
        "ts": [end - timedelta(days=d) for _ in users for d in (0, 2, 5)],
        "label": list(range(3 * len(users))),
    })  # fmt: skip
    assert training_set(labels, store=two).to_pylist() == training_set(labels, store=one).to_pylist()
    cut = training_set(labels, store=two, received_cutoff=True).to_pylist()
    assert cut == training_set(labels, store=one, received_cutoff=True).to_pylist()

    day = (end - timedelta(days=3)).date()
    assert sum(s.snapshot(day) for s in two) == one[0].snapshot(day) > 0
    assert rows(two, "SELECT * FROM user_feature_snapshots") == rows(one, "SELECT * FROM user_feature_snapshots")

    for cfg, stores in ((one_cfg, one), (two_cfg, two)):
        for k, store in enumerate(stores):
            store.export(shards.for_shard(cfg, k).serving_path)
    os.environ.update({"FEATURE_PIPELINE_SHARDS": "2"})
    try:
        exported_two = read_export(two_cfg.serving_path)
    finally:
        os.environ.pop("FEATURE_PIPELINE_SHARDS")
    exported_one = read_export(one_cfg.serving_path)
    keep = [c for c in exported_one.columns if c not in ("updated_at", "valid_as_of")]
    assert exported_two[keep].equals(exported_one[keep])

    for store in (*one, *two):
        store.recompute_all()
    assert rows(two, "SELECT * EXCLUDE (updated_at) FROM user_features") == rows(
        one, "SELECT * EXCLUDE (updated_at) FROM user_features"
    )


# -- a changed number of shards --------------------------------------------------------------------------


def test_a_changed_number_of_shards_is_refused_in_words_until_reshard_moves_the_users(
    tmp_path: Path, nats_server: LocalNats
) -> None:
    one = settings_for(tmp_path, nats_server.url)
    published = _publish(one, "a", USERS)
    Lifecycle(one).drain()
    two = changed(one, shards=2)

    with pytest.raises(shards.LayoutError, match=r"FEATURE_PIPELINE_SHARDS=2.*reshard --to 2"):
        FeatureStore.from_settings(two, 0).connect()
    assert "FEATURE_PIPELINE_SHARDS=2" in (shards.local_layout_problem(two) or "")
    report = Lifecycle(two).tick()
    assert report.problem and "FEATURE_PIPELINE_SHARDS=2" in report.problem and "reshard" in report.problem
    assert not report.fetched and not report.to_request, "a refused layout fetches nothing"
    health = build(two)
    assert any("FEATURE_PIPELINE_SHARDS=2" in p for p in health.body["problems"]) and health.code >= 1

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "FEATURE_"))}
    env.update(NATS_URL=one.nats_url, NATS_DURABLE_PREFIX=one.durable_prefix, FEATURE_STORE_PATH=one.feature_store_path)
    env["FEATURE_PIPELINE_STAGING_DIR"] = one.staging_dir
    out = subprocess.run([str(BIN / "feature-pipeline"), "reshard", "--to", "2"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "resharded 1 -> 2" in out.stdout and "FEATURE_PIPELINE_SHARDS=2" in out.stdout
    for shard in (0, 1):
        assert {shards.shard_of(u, 2) for _, u in _ids_in(two, shard)} == {shard}
    assert sorted(i for shard in (0, 1) for i, _ in _ids_in(two, shard)) == sorted(published)
    before = query(Path(one.feature_store_path), "SELECT * EXCLUDE (updated_at) FROM user_features ORDER BY 1")
    after = sorted(
        r
        for k in (0, 1)
        for r in query(
            Path(shards.for_shard(two, k).feature_store_path), "SELECT * EXCLUDE (updated_at) FROM user_features"
        )
    )
    assert after == before, "the same features, now in two stores"

    async def recorded() -> dict[str, Any] | None:
        async with await Broker.connect(nats_server.url) as broker:
            return await layout.recorded(broker, two)

    assert asyncio.run(recorded()) == layout.wanted(2)
    more = _publish(two, "b", USERS)
    Lifecycle(two).drain()
    assert sorted(stored_ids(one)) == sorted(published), "the old file is kept as it was"
    assert sorted(i for shard in (0, 1) for i, _ in _ids_in(two, shard)) == sorted(published + more)
