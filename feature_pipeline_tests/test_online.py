"""The online store (JetStream KV): equal to user_features after every kind of run, keyed so that any user id
round-trips, readable without the store file, and a clear error within a second when NATS is gone.

Real nats-server, real DuckDB files; the end-to-end test runs the real daemon and kills a run between its
DuckDB commit and its KV write."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nats.js.kv import VALID_KEY_RE

from feature_pipeline import cli, health_report, streams
from feature_pipeline.broker import kv
from feature_pipeline.broker.client import BrokerUnavailable
from feature_pipeline.broker.kv import OnlineStoreError
from feature_pipeline.broker.local import LocalNats, free_port, port_open
from feature_pipeline.ingest.online import sync
from feature_pipeline.read.online import AsyncOnlineReader, OnlineReader, OnlineReplica
from feature_pipeline.read.serving import ExportMissing, get_features, read_export
from feature_pipeline.settings import Settings
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.features import day_end
from feature_pipeline.store.loader import load_registry
from feature_pipeline.testing import run, wait_for
from feature_pipeline_tests.helpers import Env, deliveries_for, make_env, publish, settings_for, synced
from feature_pipeline_tests.test_features import DAY, EVENT, EVERY_AGGREGATION, REGISTRY_CHANGES

END = day_end(DAY)
_prefixes = itertools.count()


# -- keys -------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(user_id=st.text(min_size=1))
@example("u-42")
@example("a.b.c")
@example(" spaces and\ttabs ")
@example("*>.$KV")
@example("ünï©ødé 用户 🙂")
@example("x" * 10_000)
def test_every_user_id_has_a_valid_key_that_names_it(user_id: str) -> None:
    key = kv.key_for(user_id)
    assert VALID_KEY_RE.match(key) and ".." not in key and not key.endswith(".")
    assert len(kv.subject_of("feature-pipeline-features", key)) < 300  # fits any protocol line
    if len(user_id.encode()) <= kv.MAX_PLAIN_ID_BYTES:
        assert kv.user_for(key) == user_id
    else:
        assert key.startswith("h.") and kv.user_for(key) is None  # the value names its user instead


def test_distinct_ids_get_distinct_keys() -> None:
    ids = ["a", "A", "a ", "a.", ".a", "ä", "a" * 150, "a" * 151, "a" * 152, "", "0"]
    keys = [kv.key_for(i) for i in ids if i]
    assert len(set(keys)) == len(keys)
    with pytest.raises(ValueError, match="must not be empty"):
        kv.key_for("")


# -- the KV equals the store ------------------------------------------------------------------------------


def kv_rows(cfg: Settings) -> dict[str, dict[str, Any]]:
    """Every row in the bucket, read by a watch (the replica), keyed by the id its value names."""

    async def go() -> dict[str, dict[str, Any]]:
        replica = await OnlineReplica(cfg).start(timeout=20)
        try:
            return {row["user_id"]: row for row in (json.loads(v) for v in replica.values.values())}
        finally:
            await replica.close()

    return asyncio.run(go())


def assert_kv_equals_store(cfg: Settings, env: Env) -> None:
    stored, online = env.features(), kv_rows(cfg)
    assert set(online) == set(stored), "the same users"
    for user, row in stored.items():
        got = online[user]
        assert got["fingerprint"] == env.store.registry.fingerprint
        for col, want in row.items():
            have = got[col]
            if isinstance(want, datetime):
                have = datetime.fromisoformat(have)
            assert have == want, f"{user}.{col}: KV {have!r}, store {want!r}"


@pytest.fixture(scope="module")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNats]:
    """One server for the property test's examples; each example writes a bucket of its own."""
    server = LocalNats(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.kill()


@settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(events=st.lists(EVENT, min_size=1, max_size=14), draw=st.data())
def test_the_kv_equals_user_features_after_every_kind_of_run(
    shared_nats: LocalNats, events: list[tuple[str, str, int, int]], draw: st.DataObject
) -> None:
    """Random batches with redeliveries at random clocks (windows cross between runs), some of whose runs
    die after their commit and before their KV write; a registry change; the window schedule's run; a
    repair that removes a user's events and rebuilds (what replay ends with); an archive. After each
    sync the bucket holds exactly user_features, a key per user, each with its current row."""
    change = draw.draw(st.sampled_from(sorted(REGISTRY_CHANGES)), label="change")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        before, after = root / "before.toml", root / "after.toml"
        before.write_text("\n".join(EVERY_AGGREGATION))
        after.write_text("\n".join(REGISTRY_CHANGES[change][0]))
        cfg = settings_for(root, shared_nats.url, durable_prefix=f"p{next(_prefixes)}")
        env = make_env(root, load_registry(before))
        deliveries, cuts = deliveries_for(env.feed, events, draw, END)
        bounds = [(a, b) for a, b in zip([0, *cuts], [*cuts, len(deliveries)], strict=True) if b > a]
        offsets = draw.draw(st.lists(st.integers(0, 12 * 86_400), min_size=len(bounds), max_size=len(bounds)))
        clocks = [END - timedelta(seconds=s) for s in sorted(offsets, reverse=True)]
        switch = draw.draw(st.integers(0, len(bounds) - 1), label="switch")
        for i, ((a, b), clock) in enumerate(zip(bounds, clocks, strict=True)):
            if i == switch:
                env = Env(FeatureStore(env.store.path, registry=load_registry(after)), env.staging, env.feed)
            env.apply(deliveries[a:b], now=clock)
            if draw.draw(st.booleans(), label="run died before its KV write"):
                continue
            sync(cfg, env.store)
            assert_kv_equals_store(cfg, env)

        env.store.advance(now=END)
        sync(cfg, env.store)
        assert_kv_equals_store(cfg, env)

        gone = events[0][0]  # a repair: one user's events removed by hand, then a rebuild from what is left
        with env.con() as con:
            for spec in streams.PACKAGED:
                con.execute(f"DELETE FROM {spec.table} WHERE user_id = $u", {"u": gone})
        env.store.forget_missing_ids()
        env.store.recompute_all(consistency_sample=1)
        sync(cfg, env.store)
        assert_kv_equals_store(cfg, env)
        assert gone not in kv_rows(cfg)

        env.store.archive(root / "archive", timedelta(days=8), now=END + timedelta(days=30))
        env.store.advance(now=END + timedelta(days=30))
        sync(cfg, env.store)
        assert_kv_equals_store(cfg, env)


def test_a_store_older_than_the_kv_and_an_emptied_bucket_are_written_whole(settings: Settings, tmp_path: Path) -> None:
    """No state in the bucket (a new bucket, one deleted by hand, or a store whose rows were never written):
    the next sync writes every row, not only the pending ones."""
    env = make_env(tmp_path)
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    env.apply([env.feed.event(f"e{i}", "signals.task.completed", f"u-{i}", t0) for i in range(5)], now=t0)
    with env.con() as con:
        con.execute("DELETE FROM online_pending")  # as a store made before the online store existed
    first = sync(settings, env.store)
    assert first.everything and first.written == 5
    assert_kv_equals_store(settings, env)

    async def drop_bucket() -> None:
        from feature_pipeline.broker.client import Broker

        async with await Broker.connect(settings.nats_url) as broker:
            await broker.js.delete_key_value(kv.bucket_for(settings.durable_prefix))

    run(drop_bucket())
    again = sync(settings, env.store)
    assert again.everything and again.written == 5
    assert_kv_equals_store(settings, env)
    assert sync(settings, env.store).written == 0, "nothing pending, nothing written"


def test_a_kv_row_that_differs_from_the_store_is_found_and_written_again(settings: Settings, tmp_path: Path) -> None:
    """The check's comparison: a value changed behind the pipeline's back (or lost) fails the sample that holds
    it, and the next sync writes it again."""
    env = make_env(tmp_path)
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    env.apply([env.feed.event(f"e{i}", "signals.task.completed", f"u-{i}", t0) for i in range(3)], now=t0)
    assert sync(settings, env.store, compare=10).different == ()
    bucket = kv.bucket_for(settings.durable_prefix)

    bad = dict(kv_rows(settings)["u-1"], signal_count_total=99)

    async def tamper() -> None:
        from feature_pipeline.broker.client import Broker

        async with await Broker.connect(settings.nats_url) as broker:
            await broker.js.publish(kv.subject_of(bucket, kv.key_for("u-1")), json.dumps(bad).encode())
            await kv.delete_many(broker, bucket, [kv.key_for("u-2")])

    run(tamper())
    found = sync(settings, env.store, compare=10)
    assert found.compared == 3 and found.different == ("u-1", "u-2")
    assert sync(settings, env.store, compare=10).different == ()
    assert_kv_equals_store(settings, env)


@pytest.mark.parametrize("fast", [True, False], ids=["plain publishes checked by sequence", "public API"])
def test_bulk_writes_are_all_stored_even_with_another_writer_on_the_bucket(nats_server: LocalNats, fast: bool) -> None:
    """A writer on the same bucket moves the stream's sequence under the plain publishes, so their check cannot
    vouch for them: every row is written again with an ack. Without the fast path, every row is acked."""

    async def go() -> dict[str, bytes]:
        from feature_pipeline.broker.client import Broker

        async with (
            await Broker.connect(nats_server.url, fast=fast) as ours,
            await Broker.connect(nats_server.url) as other,
        ):
            await kv.ensure_bucket(ours, "b", 1)
            rows = [(kv.key_for(f"u-{i}"), b'{"n": %d}' % i) for i in range(20_000)]
            done = asyncio.Event()

            async def interfere() -> int:
                n = 0
                while not done.is_set():
                    await other.js.publish(kv.subject_of("b", "meta.other"), b"x")
                    n += 1
                return n

            meddler = asyncio.ensure_future(interfere())
            await asyncio.sleep(0.01)
            written = await kv.put_many(ours, "b", lambda: [rows[:10_000], rows[10_000:]])
            done.set()
            assert written == 20_000 and await meddler > 0
            return await kv.get_many(ours.nc, "b", [k for k, _ in rows], 5)

    found = asyncio.run(go())
    assert len(found) == 20_000 and found[kv.key_for("u-19999")] == b'{"n": 19999}'


def test_a_plain_publish_the_stream_drops_is_caught_by_the_sequence_check(nats_server: LocalNats) -> None:
    """A value the bucket refuses (over its max_value_size) is dropped without a word on the plain path; the
    sequence check notices, the rows are put again with an ack, and the refusal surfaces as OnlineStoreError."""
    from nats.js.api import KeyValueConfig

    async def go() -> None:
        from feature_pipeline.broker.client import Broker

        async with await Broker.connect(nats_server.url, fast=True) as broker:
            await broker.js.create_key_value(KeyValueConfig(bucket="small", history=1, direct=True, max_value_size=64))
            rows = [(kv.key_for(f"u-{i}"), b"{}") for i in range(100)] + [(kv.key_for("big"), b"x" * 200)]
            await kv.put_many(broker, "small", lambda: [rows])

    with pytest.raises(OnlineStoreError, match="could not write rows to the online store small") as caught:
        asyncio.run(go())
    assert "did not confirm" in str(caught.value)  # the refused put has no ack: the bounded wait ends it


# -- readers ----------------------------------------------------------------------------------------------

ODD_IDS = ["u.1 x", "*>", "ünï©ødé 用户", "ü" * 256]  # the last: 512 bytes, the longest id an envelope takes


def _stored(env: Env, cfg: Settings, ids: list[str], t0: datetime) -> None:
    env.apply([env.feed.event(f"e-{i}-{t0:%s}", "signals.task.completed", u, t0) for i, u in enumerate(ids)], now=t0)
    sync(cfg, env.store)


def test_readers_return_rows_for_any_id_in_order_and_empty_rows_for_unknown_users(
    settings: Settings, tmp_path: Path
) -> None:
    env = make_env(tmp_path)
    t0 = datetime.now(UTC).replace(microsecond=0)
    _stored(env, settings, ODD_IDS, t0)
    ask = ["nobody", *ODD_IDS, ODD_IDS[0]]

    frame = get_features(ask, settings)  # the module-level API, on its shared reader
    assert list(frame["user_id"]) == ask
    assert frame["signal_count_total"].astype(object).fillna(-1).tolist() == [-1, 1, 1, 1, 1, 1]
    assert list(frame.columns) == ["user_id", *env.store.registry.names, "updated_at", "valid_as_of"]
    assert str(frame["signal_count_total"].dtype) == "int64[pyarrow]", "integers stay integers beside empty rows"
    assert frame.loc[1, "updated_at"] == t0 and frame.loc[1, "valid_as_of"] == t0

    reader = OnlineReader(settings)
    try:
        assert reader.get_rows([ODD_IDS[3]])[0]["user_id"] == ODD_IDS[3]  # a hashed key: one direct get
        assert reader.get_features(ask).equals(frame)
        many = [f"nobody-{i}" for i in range(2500)] + [ODD_IDS[2]]  # three batched gets
        assert reader.get_rows(many)[-1]["signal_count_total"] == 1
    finally:
        reader.close()

    async def from_async() -> pd.DataFrame:
        async with AsyncOnlineReader(settings) as r:
            return await r.get_features(ask)

    assert asyncio.run(from_async()).equals(frame)


def _system_nats() -> str:
    """The machine's own nats-server (Debian's is 2.9, older than batched direct gets), not the wheel's."""
    found = shutil.which("nats-server", path="/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin")
    if not found:
        pytest.skip("no system nats-server (Debian's package) on this machine: the 2.9 compatibility check is skipped")
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout.strip()
    if not version.startswith(("nats-server: v2.9.", "nats-server: v2.10.")):
        pytest.skip(f"the system nats-server is {version}, not older than 2.11: nothing to check here")
    return found


def test_writes_and_reads_work_on_a_server_older_than_batched_gets(tmp_path: Path) -> None:
    """On a server without `multi_last` (before 2.11, such as Debian's 2.9) many users are read by one direct
    get each, side by side; runs write the same way as on a new server."""
    port = free_port()
    server = subprocess.Popen(
        [_system_nats(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open("127.0.0.1", port), 15, "the system nats-server")
        cfg = settings_for(tmp_path, f"nats://127.0.0.1:{port}")
        env = make_env(tmp_path)
        ids = [f"u-{i}" for i in range(30)]
        _stored(env, cfg, ids, datetime.now(UTC))
        reader = OnlineReader(cfg)
        try:
            rows = reader.get_rows(["nobody", *ids])
        finally:
            reader.close()
        assert rows[0] is None and [r["user_id"] for r in rows[1:]] == ids
        assert_kv_equals_store(cfg, env)
    finally:
        server.kill()
        server.wait(10)


def test_the_replica_follows_each_run(settings: Settings, tmp_path: Path) -> None:
    env = make_env(tmp_path)
    t0 = datetime.now(UTC)
    _stored(env, settings, ["u-1"], t0)
    seen: list[float] = []

    async def go() -> None:
        replica = await OnlineReplica(settings).start()
        try:
            assert replica.get_rows(["u-1"])[0]["signal_count_total"] == 1
            written = asyncio.get_running_loop().run_in_executor(
                None, _stored, env, settings, ["u-1", "u-2"], t0 + timedelta(seconds=1)
            )
            await written
            done = time.monotonic()
            while replica.get_rows(["u-1"])[0]["signal_count_total"] != 2:
                # The bench measures how soon (tens of ms); here only that it comes, with room for a loaded CI.
                assert time.monotonic() - done < 5, "the replica saw the run's write"
                await asyncio.sleep(0.005)
            seen.append(time.monotonic() - done)
            frame = replica.get_features(["u-2", "nobody"])
            assert list(frame["signal_count_total"].astype(object).fillna(-1)) == [1, -1]
        finally:
            await replica.close()

    asyncio.run(go())
    assert seen


def test_a_replica_starts_only_once_it_holds_every_value(settings: Settings, tmp_path: Path) -> None:
    """`start()` returns after the last value has been applied, not when the server has merely sent them all
    (they may still wait in the client's buffer: a race the property test once lost under load)."""
    env = make_env(tmp_path)
    _stored(env, settings, [f"u-{i}" for i in range(500)], datetime.now(UTC))

    async def starts() -> list[int]:
        held = []
        for _ in range(20):
            replica = await OnlineReplica(settings).start()
            held.append(len(replica.values))
            await replica.close()
        return held

    assert asyncio.run(starts()) == [500] * 20


def _blackhole() -> tuple[socket.socket, str]:
    """A TCP listener that accepts and never answers: a server behind a partition, as a client sees it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(sock.accept()[0]) for _ in range(16)], daemon=True).start()
    return sock, f"nats://127.0.0.1:{sock.getsockname()[1]}"


def test_an_unreachable_nats_is_a_clear_error_within_the_timeout(
    settings: Settings, nats_server: LocalNats, tmp_path: Path
) -> None:
    """Refused, silent, and lost after connecting: each read raises OnlineStoreError naming the server,
    within about its timeout, never a hang nor rows of unknown age; a run's KV write fails in words too."""
    env = make_env(tmp_path)
    _stored(env, settings, ["u-1"], datetime.now(UTC))
    hole, silent = _blackhole()
    closed = f"nats://127.0.0.1:{nats_server.port + 1}"
    try:
        for url in (closed, silent):
            cfg = settings_for(tmp_path, url)
            started = time.monotonic()
            with pytest.raises(OnlineStoreError, match=r"cannot reach NATS at nats://127\.0\.0\.1:\d+"):
                OnlineReader(cfg, timeout=0.5).get_rows(["u-1"])
            assert time.monotonic() - started < 5, "bounded by the 0.5 s timeout, not by TCP's"
            with pytest.raises(BrokerUnavailable, match="cannot reach NATS"):  # the run's write: an outage
                sync(cfg, env.store)
    finally:
        hole.close()

    reader = OnlineReader(settings, timeout=0.5)
    assert reader.get_rows(["u-1"])[0] is not None
    nats_server.kill()
    started = time.monotonic()
    with pytest.raises(OnlineStoreError, match=r"not connected to NATS|did not answer"):
        reader.get_rows(["u-1"])
    assert time.monotonic() - started < 5
    reader.close()


# -- the Parquet export -----------------------------------------------------------------------------------


def test_the_export_is_written_on_demand_and_replaced_atomically(env: Env, tmp_path: Path) -> None:
    target = tmp_path / "export" / "user_features.parquet"
    with pytest.raises(ExportMissing, match="feature-pipeline export"):
        read_export(target)
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    env.apply([env.feed.event("a", "signals.task.completed", "u", t0)], now=t0)
    assert not target.exists(), "no run writes the export: it costs O(users)"
    rows, as_of = env.store.export(target)
    first = target.stat().st_ino
    frame = read_export(target)
    assert rows == 1 and as_of == t0 and frame.loc[0, "valid_as_of"] == t0
    env.apply([env.feed.event("b", "signals.task.completed", "v", t0)], now=t0)
    assert env.store.export(target)[0] == 2 and target.stat().st_ino != first
    assert not list(target.parent.glob(".*tmp"))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


# -- end to end -------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_run_killed_between_its_commit_and_its_kv_write_is_written_by_its_retry(make_pipeline: Any) -> None:
    """kill-after-commit: the first run that stores events dies by SIGKILL right after its DuckDB commit. Run
    monitoring fails it, the sensor retries the batch, the retry absorbs every event (already stored) and
    writes the pending rows: the KV equals the store, each event stored once, acked once."""
    p = make_pipeline({"FEATURE_PIPELINE_FAULTS": "kill-after-commit"})
    sent = [synced(f"evt-{i}", f"u-{i % 7}") for i in range(40)]
    run(publish(p.nats.url, sent))
    wait_for(lambda: p.runs(dg.DagsterRunStatus.FAILURE), 120, "the killed run marked failed")
    wait_for(lambda: len(p.stored_ids()) == len(sent) and p.settled(), 120, "stored and acked")
    assert sorted(p.stored_ids()) == sorted(f"evt-{i}" for i in range(40))
    assert p.runs(dg.DagsterRunStatus.SUCCESS), "the retry succeeded"
    cfg = settings_for(p.root, p.nats.url, durable_prefix=p.prefix, feature_store_path=p.db)
    stored = dict(p.query("SELECT user_id, signal_count_total FROM user_features"))
    online = {u: r["signal_count_total"] for u, r in kv_rows(cfg).items()}
    assert online == stored and sum(online.values()) == len(sent)
    out = p.cli("features", "u-3")
    assert out.returncode == 0 and json.loads(out.stdout)["signal_count_total"] == stored["u-3"]


# -- health -----------------------------------------------------------------------------------------------


def test_health_reports_the_bucket_and_how_far_it_is_behind_the_store(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`health_report()` is what `health --json` prints; its online part counts the keys, gives the clock of
    the last write and, with the store on this host, how far that is behind the store's own clock."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "no-instance"))
    for var in cfg_vars(settings):
        monkeypatch.setenv(*var)
    base = make_env(tmp_path)
    env = Env(FeatureStore(settings.feature_store_path), base.staging, base.feed)  # the store health reads
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    env.apply([env.feed.event(f"e{i}", "signals.task.completed", f"u-{i}", t0) for i in range(3)], now=t0)
    bucket = kv.bucket_for(settings.durable_prefix)
    report = health_report()
    assert f"online store {bucket} is missing while the store holds features" in " ".join(report["problems"])

    sync(settings, env.store)
    report = health_report()
    assert cli.main(["health", "--json"]) in (0, 1)
    printed = json.loads(capsys.readouterr().out)
    assert printed["online"] == report["online"] and set(printed) == set(report)
    online = report["online"]
    assert online["keys"] == 3 and online["behind_store_seconds"] == 0 and online["pending_rows"] == 0
    assert datetime.fromisoformat(online["valid_as_of"]) == t0
    assert not [p for p in report["problems"] if "online store" in p]

    # A run that committed 5 minutes later and could not write the KV: its rows wait, health says so.
    env.apply([env.feed.event("late", "signals.task.completed", "u-9", t0)], now=t0 + timedelta(minutes=5))
    report = health_report()
    assert report["online"]["behind_store_seconds"] == 300 and report["online"]["pending_rows"] == 1
    assert f"online store {bucket} is 300 s behind the store (1 rows wait to be written)" in " ".join(
        report["problems"]
    )
    assert report["status"] != "ok"


def cfg_vars(cfg: Settings) -> list[tuple[str, str]]:
    """The variables that make `settings.load()` give `cfg` (as a process with that environment would)."""
    from feature_pipeline.settings import VARIABLES

    return [(v.name, str(getattr(cfg, v.field))) for v in VARIABLES if getattr(cfg, v.field) not in ("", None)]
