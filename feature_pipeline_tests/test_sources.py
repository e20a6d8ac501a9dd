"""Sources as configuration: a team's own stream, subjects and pydantic models, declared in the feature
registry, read end to end through real NATS and real DuckDB; and each bad configuration refused in words."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from feature_pipeline import streams
from feature_pipeline.broker.client import Broker
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.ingest.failures import Cause
from feature_pipeline.ingest.replay import ReplayRange, replay
from feature_pipeline.settings import Settings
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.features import compute_features
from feature_pipeline.store.loader import DEFAULT_FILE, RegistryError, load_registry
from feature_pipeline.store.sources import packaged
from feature_pipeline.testing import query, run, wait_for
from feature_pipeline_tests.helpers import Lifecycle, caught_up, changed, publish, synced

# The team's own models, in a module of its own (what `models = "orders_team_events:PAYLOADS"` imports).
MODELS = """
from pydantic import BaseModel, ConfigDict, Field


class Placed(BaseModel):
    model_config = ConfigDict(extra="allow")
    order_id: str
    amount: float = Field(ge=0)


class Refunded(BaseModel):
    order_id: str
    amount: float


PAYLOADS = {"placed": Placed, "refunded": Refunded}
NOT_A_DICT = [Placed]
NOT_MODELS = {"placed": dict}
"""
ORDERS = """
[[source]]
name = "orders"
stream = "ORDERS"
subjects = ["orders.>"]
table = "order_events"
models = "orders_team_events:PAYLOADS"
unknown_types = "dead_letter"
description = "One row per order event."
"""
FEATURES = """
[[feature]]
name = "signal_count_total"
source = "signals"
aggregation = "count"

[[feature]]
name = "orders_7d"
source = "orders"
event_types = ["placed"]
aggregation = "count"
window = "7d"

[[feature]]
name = "spend_total"
source = "orders"
event_types = ["placed"]
aggregation = "sum"
field = "data.amount"
type = "DOUBLE"

[[feature]]
name = "last_amount"
source = "orders"
aggregation = "last"
field = "data.amount"
type = "DOUBLE"
"""
# The packaged sources, as the packaged registry declares them.
PACKAGED_SOURCES = DEFAULT_FILE.read_text().split("\n[[feature]]\n", 1)[0] + "\n"


@pytest.fixture
def team(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the team's models module on sys.path (and PYTHONPATH, for subprocesses)."""
    folder = tmp_path / "team"
    folder.mkdir()
    (folder / "orders_team_events.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    sys.modules.pop("orders_team_events", None)
    return folder


def registry_file(folder: Path, text: str) -> Path:
    path = folder / f"registry-{abs(hash(text))}.toml"
    path.write_text(text)
    return path


def order(event_id: str, user: str, type_: str, at: datetime, **data: Any) -> tuple[str, bytes]:
    return f"orders.{type_}", make_envelope(event_id, type_, user, at, data)


def test_a_third_source_is_stored_once_its_poison_dead_lettered_and_its_features_equal_the_reference(
    settings: Settings, team: Path
) -> None:
    path = registry_file(team, PACKAGED_SOURCES + ORDERS + FEATURES)
    cfg = changed(settings, features_file=path)
    now = datetime.now(UTC)
    events = [
        order("o-1", "u-1", "placed", now - timedelta(days=1), order_id="A", amount=12.5),
        order("o-2", "u-1", "placed", now - timedelta(days=9), order_id="B", amount=7.5),
        order("o-3", "u-2", "refunded", now - timedelta(hours=2), order_id="C", amount=3.0),
        order("o-bad", "u-2", "placed", now, order_id="D", amount=-5),  # the team's model refuses it
        order("o-new", "u-2", "shipped", now, order_id="E"),  # a type the models do not name
        order("o-1", "u-1", "placed", now - timedelta(days=1), order_id="A", amount=12.5),  # published twice
        synced("evt-s", "u-1"),
    ]
    life = Lifecycle(cfg)
    life.tick()  # the sensor's first tick makes the source's stream and consumer
    run(publish(cfg.nats_url, events))
    life.drain()

    db = Path(cfg.feature_store_path)
    stored = query(db, "SELECT event_id, type, user_id FROM order_events ORDER BY 1")
    assert stored == [("o-1", "placed", "u-1"), ("o-2", "placed", "u-1"), ("o-3", "refunded", "u-2")]
    reasons = dict(query(db, "SELECT original_subject, reason FROM dead_letters WHERE original_stream = 'ORDERS'"))
    assert reasons["orders.placed"].startswith("invalid placed data: amount: Input should be greater than or equal")
    assert reasons["orders.shipped"] == (
        "unknown event type 'shipped': source 'orders' dead-letters types that its models "
        "(orders_team_events:PAYLOADS) do not name"
    )
    assert caught_up(cfg, ("SIGNALS", "FEEDBACK", "ORDERS", "DEADLETTER"))

    store = FeatureStore.from_settings(cfg)
    con = store.connect(read_only=True)
    try:
        cols = ["user_id", *store.registry.names, "updated_at"]
        found = con.execute(f"SELECT {', '.join(cols)} FROM user_features").fetchall()
        rows = {r[0]: dict(zip(cols, r, strict=True)) for r in found}
        for user, row in rows.items():  # each row equals the reference at its own clock
            assert compute_features(con, store.registry, row["updated_at"], [user]) == {user: row}
    finally:
        con.close()
    assert (rows["u-1"]["orders_7d"], rows["u-1"]["spend_total"], rows["u-1"]["last_amount"]) == (1, 20.0, 12.5)
    assert (rows["u-2"]["orders_7d"], rows["u-2"]["last_amount"], rows["u-1"]["signal_count_total"]) == (0, 3.0, 1)


def test_a_source_added_to_an_existing_store_is_read_and_one_removed_keeps_its_table(
    settings: Settings, team: Path
) -> None:
    """Today's store gets a third source on its next tick and run; taking it out again leaves its table and
    its consumer, and the run says so."""
    run(publish(settings.nats_url, [synced("evt-1")]))
    Lifecycle(settings).drain()
    three = changed(settings, features_file=registry_file(team, PACKAGED_SOURCES + ORDERS + FEATURES))
    Lifecycle(three).tick()  # the next tick makes the new source's stream and consumer
    run(publish(settings.nats_url, [order("o-1", "u-1", "placed", datetime.now(UTC), order_id="A", amount=1.0)]))
    Lifecycle(three).drain()
    db = Path(settings.feature_store_path)
    assert query(db, "SELECT event_id FROM order_events") == [("o-1",)]
    assert query(db, "SELECT event_id FROM signal_events") == [("evt-1",)]
    advisories = run(stream_subjects(settings.nats_url, streams.advisory_stream(settings.durable_prefix)))
    assert any(s.endswith(f".ORDERS.{settings.durable_prefix}-orders") for s in advisories), (
        "the new consumer's MAX_DELIVERIES advisories are captured too"
    )

    one_feature = "[[feature]]" + FEATURES.split("[[feature]]")[1]
    two = changed(settings, features_file=registry_file(team, PACKAGED_SOURCES + one_feature))
    refresh, _ = FeatureStore.from_settings(two).advance()
    assert refresh.sources_changed == [
        "source 'orders' was removed from the feature registry: its table order_events is kept (1 rows) and its "
        "consumer on stream ORDERS is no longer read (its messages wait in NATS until the source is back)"
    ]
    assert FeatureStore.from_settings(two).advance()[0].sources_changed == [], "said once"
    run(publish(settings.nats_url, [order("o-2", "u-1", "placed", datetime.now(UTC), order_id="B", amount=2.0)]))
    Lifecycle(two).drain()
    assert query(db, "SELECT event_id FROM order_events") == [("o-1",)], "o-2 waits in ORDERS"
    orders = next(s for s in load_registry(three.features_file).event_streams if s.key == "orders")

    async def pending() -> int:
        async with await Broker.connect(settings.nats_url) as broker:
            info = await broker.consumer_info("ORDERS", streams.consumer_name(settings.durable_prefix, orders))
            return int(info.num_pending)

    assert run(pending()) == 1
    refresh, _ = FeatureStore.from_settings(three).advance()
    assert refresh.sources_changed == [
        "source 'orders' is back: its events are read again from where its consumer stopped"
    ]


async def stream_subjects(url: str, stream: str) -> list[str]:
    async with await Broker.connect(url) as broker:
        return list((await broker.js.stream_info(stream)).config.subjects or [])


def test_a_batch_staged_before_its_source_was_removed_waits_for_it(settings: Settings, team: Path) -> None:
    """The batch's run fails naming the stream, as a failure outside its messages: nothing is indexed or
    dropped, no delivery is spent, and the batch is stored once the source is back."""
    three = changed(settings, features_file=registry_file(team, PACKAGED_SOURCES + ORDERS + FEATURES))
    life = Lifecycle(three)
    life.tick()
    run(publish(settings.nats_url, [order("o-1", "u-1", "placed", datetime.now(UTC), order_id="A", amount=1.0)]))
    (batch,) = life.tick().to_request
    one_feature = "[[feature]]" + FEATURES.split("[[feature]]")[1]
    without = Lifecycle(changed(settings, features_file=registry_file(team, PACKAGED_SOURCES + one_feature)))
    assert not without.execute(batch)
    failure = without.runs.failures[f"run-{batch}-0"]
    assert failure.cause is Cause.INFRASTRUCTURE
    assert "events of streams that are not sources in the feature registry (1 from stream ORDERS)" in failure.text
    assert query(Path(settings.feature_store_path), "SELECT count(*) FROM event_index") == [(0,)]
    assert life.execute(batch)
    assert life.tick().acked == 1
    assert query(Path(settings.feature_store_path), "SELECT event_id FROM order_events") == [("o-1",)]


def test_a_registry_without_sources_reads_the_packaged_ones_and_keeps_its_fingerprint(tmp_path: Path) -> None:
    """Stores made before sources were configuration open unchanged: the same sources, and the fingerprint
    (which would rebuild every row if it moved) does not depend on them."""
    packaged_file = load_registry()
    without = load_registry(registry_file(tmp_path, DEFAULT_FILE.read_text().replace(PACKAGED_SOURCES, "")))
    assert without.sources == packaged_file.sources == packaged()
    assert without.fingerprint == packaged_file.fingerprint
    reworded = DEFAULT_FILE.read_text().replace("One row per recommendation-feedback event id.", "Feedback.")
    assert load_registry(registry_file(tmp_path, reworded)).fingerprint == packaged_file.fingerprint


BAD = [
    (
        ORDERS.replace('subjects = ["orders.>"]', 'subjects = ["signals.orders.>"]'),
        r"source #3 \('orders'\) subject 'signals.orders.>' overlaps source #1 \('signals'\) subject 'signals.>': "
        "a message must belong to one stream",
    ),
    (
        ORDERS.replace('subjects = ["orders.>"]', 'subjects = ["deadletter.orders.>"]'),
        r"source #3 \('orders'\) subjects: subject 'deadletter.orders.>' is captured by the pipeline's own "
        r"dead-letter stream \(deadletter.>\)",
    ),
    (
        ORDERS.replace("orders_team_events:PAYLOADS", "no_such_team_module:PAYLOADS"),
        r"source #3 \('orders'\): models 'no_such_team_module:PAYLOADS': cannot import no_such_team_module "
        r"\(ModuleNotFoundError: No module named 'no_such_team_module'\)",
    ),
    (
        ORDERS.replace("orders_team_events:PAYLOADS", "orders_team_events:NOT_MODELS"),
        r"source #3 \('orders'\): models 'orders_team_events:NOT_MODELS': 'placed' maps to <class 'dict'>, which "
        "is not a pydantic model",
    ),
    (
        ORDERS.replace("orders_team_events:PAYLOADS", "orders_team_events:NOT_A_DICT"),
        r"models 'orders_team_events:NOT_A_DICT' must be a dict of event type -> pydantic model, got list",
    ),
    (
        ORDERS.replace('table = "order_events"', 'table = "signal_events"'),
        r"source #3 \('orders'\) has the same table 'signal_events' as source #1",
    ),
    (
        ORDERS.replace('table = "order_events"', 'table = "user_features"'),
        r"source #3 \('orders'\) table: table 'user_features' is one the store keeps for itself",
    ),
    (
        ORDERS.replace('stream = "ORDERS"', 'stream = "DEADLETTER"'),
        r"stream 'DEADLETTER' is the pipeline's own or NATS's",
    ),
    (
        ORDERS.replace('subjects = ["orders.>"]', 'subjects = ["orders.*"]'),
        r"subject 'orders.\*' must be literal tokens followed by '.>', like 'orders.>'",
    ),
]


@pytest.mark.parametrize(("source", "message"), BAD, ids=lambda v: v[:40] if isinstance(v, str) else v)
def test_bad_sources_stop_the_load_naming_the_file_and_the_entry(team: Path, source: str, message: str) -> None:
    path = registry_file(team, PACKAGED_SOURCES + source + FEATURES)
    with pytest.raises(RegistryError, match=message) as caught:
        load_registry(path)
    assert str(path) in str(caught.value)


def test_a_feature_on_an_unknown_source_stops_the_load(team: Path) -> None:
    path = registry_file(team, PACKAGED_SOURCES + FEATURES)
    with pytest.raises(RegistryError, match=r"feature #2 \('orders_7d'\) reads source 'orders', which is not a"):
        load_registry(path)


@pytest.mark.e2e
def test_a_third_source_under_the_real_daemon_is_stored_once_and_dead_letters_its_poison(
    tmp_path: Path, team: Path, make_pipeline: Any
) -> None:
    """The code location with a registry of three sources, under dagster-daemon: the sensor makes the ORDERS
    stream and its consumer, runs store its events once, the poison goes to dead_letters with the team's
    model's words, and every message is acked."""
    path = registry_file(team, PACKAGED_SOURCES + ORDERS + FEATURES)
    p = make_pipeline({"FEATURE_PIPELINE_FEATURES_FILE": str(path), "PYTHONPATH": str(team)})

    def made() -> bool:
        try:
            return "ORDERS" in p.lag()
        except NotFoundError:  # not yet: the sensor's first tick makes the streams and consumers
            return False

    wait_for(made, 60, "the sensor to make the ORDERS consumer", interval=1)
    now = datetime.now(UTC)
    good = [
        order(f"o-{i}", f"u-{i % 3}", "placed", now - timedelta(hours=i), order_id=str(i), amount=i) for i in range(20)
    ]
    run(publish(p.nats.url, [*good, order("o-bad", "u-1", "placed", now, order_id="X", amount="lots"), good[0]]))
    wait_for(lambda: len(p.query("SELECT event_id FROM order_events")) == 20, 90, "the orders stored")
    wait_for(lambda: p.settled(), 60, "every message acked")
    assert sorted(r[0] for r in p.query("SELECT event_id FROM order_events")) == sorted(f"o-{i}" for i in range(20))
    (reason,) = p.query("SELECT reason FROM dead_letters WHERE original_stream = 'ORDERS'")
    assert reason[0].startswith("invalid placed data: amount: Input should be a valid number"), reason
    spend = dict(p.query("SELECT user_id, spend_total FROM user_features"))
    assert spend == {f"u-{u}": float(sum(i for i in range(20) if i % 3 == u)) for u in range(3)}


def test_a_store_made_before_sources_were_configuration_opens_unchanged(settings: Settings) -> None:
    """What this change adds to a store is the known_sources table; a store without it (made by the code
    before) opens with its rows as they were: no rebuild, no column change, and no source reported as new."""
    run(publish(settings.nats_url, [synced("evt-1"), synced("evt-2", "u-2")]))
    Lifecycle(settings).drain()
    db = Path(settings.feature_store_path)
    con = FeatureStore.from_settings(settings).connect()
    try:
        con.execute("DROP TABLE known_sources")
        before = con.execute("SELECT * FROM user_features ORDER BY user_id").fetchall()
    finally:
        con.close()
    refresh, _ = FeatureStore.from_settings(settings).advance()
    assert (refresh.rebuilt, refresh.schema_changes, refresh.partials_rebuilt, refresh.sources_changed) == (
        False,
        [],
        [],
        [],
    )
    after = query(db, "SELECT * FROM user_features ORDER BY user_id")
    assert [r[:-1] for r in after] == [r[:-1] for r in before], "every feature as it was (updated_at aside)"
    assert query(db, "SELECT name, stream, table_name FROM known_sources ORDER BY 1") == [
        ("feedback", "FEEDBACK", "feedback_events"),
        ("signals", "SIGNALS", "signal_events"),
    ]


def test_a_source_of_two_subjects_is_read_watched_and_replayed(settings: Settings, team: Path) -> None:
    """`subjects = ["shop.orders.>", "shop.refunds.>"]`: the event type is what `>` matched under either; the
    consumer (without a filter), the oldest-unacked figure and a replay read every subject of the stream."""
    two = ORDERS.replace('subjects = ["orders.>"]', 'subjects = ["shop.orders.>", "shop.refunds.>"]')
    cfg = changed(settings, features_file=registry_file(team, PACKAGED_SOURCES + two + FEATURES))
    life = Lifecycle(cfg)
    life.tick()
    at = datetime.now(UTC)
    placed = [make_envelope(f"o-{i}", "placed", "u-1", at, {"order_id": str(i), "amount": 2.0}) for i in range(2)]
    refunded = make_envelope("r-1", "refunded", "u-1", at, {"order_id": "0", "amount": 2.0})
    run(publish(cfg.nats_url, [*(("shop.orders.placed", b) for b in placed), ("shop.refunds.refunded", refunded)]))
    staged = life.tick()
    assert staged.problem is None and staged.fetched == {"ORDERS": 3}, staged.summary()
    orders = next(s for s in staged.stats if s.stream == "ORDERS")
    assert orders.num_ack_pending == 3 and orders.oldest_unacked_age_seconds > 0
    life.drain()
    db = Path(cfg.feature_store_path)
    stored = [("o-0", "placed"), ("o-1", "placed"), ("r-1", "refunded")]
    assert query(db, "SELECT event_id, type FROM order_events ORDER BY 1") == stored

    db.unlink()
    report = replay(cfg.nats_url, cfg.nats_auth, FeatureStore.from_settings(cfg), ReplayRange("ORDERS"), log=str)
    assert (report.read, report.stored, report.poison) == (3, 3, 0)
    assert query(db, "SELECT event_id, type FROM order_events ORDER BY 1") == stored
