"""One feature definition, every path: micro-batch updates, sliding windows, snapshots, point-in-time joins.

Real DuckDB files and real staged batches; the clock is passed in so windows can be crossed exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feature_pipeline import training_set
from feature_pipeline.read.training import LabelsError
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.features import day_end
from feature_pipeline.store.loader import DEFAULT_FILE, RegistryError, load_registry
from feature_pipeline_tests.helpers import SUBJECTS, Env, data_for, deliveries_for
from feature_pipeline_tests.helpers import make_env as make_store_env

DAY = date(2026, 6, 1)
END = day_end(DAY)


def make_env(root: Path, registry_file: Path | None = None) -> Env:
    return make_store_env(root, load_registry(registry_file))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def table(env: Env, name: str = "user_features", where: str = "") -> dict[str, dict[str, Any]]:
    return env.table(name, where)


def features_only(row: dict[str, Any], env: Env) -> dict[str, Any]:
    return {k: row[k] for k in env.store.registry.names}


# -- sliding windows --------------------------------------------------------------------------


def test_windows_slide_with_the_clock_without_new_events(env: Env) -> None:
    """A user who stops sending events sees the 24 h count fall to 0 when the clock passes, not at their next event."""
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    f = env.feed
    env.apply([f.event("a", "signals.task.completed", "quiet", t0)], now=t0 + timedelta(minutes=1))
    env.apply([f.event("b", "signals.task.completed", "busy", t0)], now=t0 + timedelta(hours=2))
    assert table(env)["quiet"]["signal_count_24h"] == 1

    # 24 h later: no event for "quiet", only a batch of someone else; quiet's row moves all the same.
    later = t0 + timedelta(hours=24, seconds=1)
    result = env.apply([f.event("c", "signals.task.completed", "other", later)], now=later)
    rows = table(env)
    assert rows["quiet"]["signal_count_24h"] == 0 and rows["quiet"]["signal_count_7d"] == 1
    assert rows["quiet"]["updated_at"] == later
    assert result.refresh.valid_as_of == later and result.refresh.rows_written == 3  # other + quiet + busy

    # No batch at all: the clock moves by itself (the schedule's runs).
    refresh, health = env.store.advance(now=t0 + timedelta(days=7, seconds=1))
    rows = table(env)
    assert all(r["signal_count_7d"] == 0 for u, r in rows.items() if u != "other")
    assert rows["other"]["signal_count_7d"] == 1
    assert rows["other"]["signal_count_24h"] == 0  # its own 24 h passed too
    assert refresh.rows_written == 3 and not refresh.rebuilt and health.inconsistent_users == []
    # ... and a move that crosses no window edge recomputes nothing.
    refresh, _ = env.store.advance(now=t0 + timedelta(days=7, seconds=2))
    assert refresh.rows_written == 0
    assert table(env) == rows


def test_future_dated_event_counts_once_its_time_comes(env: Env) -> None:
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    env.apply([env.feed.event("f", "signals.task.completed", "u", t0 + timedelta(hours=1))], now=t0)
    assert table(env)["u"]["signal_count_total"] == 0
    env.store.advance(now=t0 + timedelta(hours=2))
    assert table(env)["u"]["signal_count_total"] == 1


def test_late_events_are_stored_and_counted_as_late(env: Env) -> None:
    now = datetime(2026, 6, 10, 12, tzinfo=UTC)
    f = env.feed
    result = env.apply(
        [
            f.event("on-time", "signals.task.completed", "u", now - timedelta(minutes=59)),
            f.event("late-1", "signals.task.completed", "u", now - timedelta(days=3)),
            f.event("late-2", "feedback.recommendation.shown", "u", datetime(2026, 6, 1, 8, tzinfo=UTC)),
        ],
        now=now,
    )
    assert result.late_events == 2
    assert result.late_days == ["2026-06-01", "2026-06-07"]
    assert result.max_lateness_seconds == pytest.approx((now - datetime(2026, 6, 1, 8, tzinfo=UTC)).total_seconds())
    assert result.new_in("SIGNALS") == 2 and result.new_in("FEEDBACK") == 1
    assert features_only(table(env)["u"], env) == features_only(env.reference(now)["u"], env)


# -- every path equals every other -------------------------------------------------------------

# Each example builds a store on disk: few examples, no deadline, no example database.
PROPERTY = settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

EVENT = st.tuples(
    st.sampled_from(["u-1", "u-2", "u-3", "u-4"]),
    st.sampled_from(SUBJECTS),
    st.integers(0, 10 * 86_400_000),  # occurred this many ms before the end of DAY
    st.integers(0, 50),
)


@PROPERTY
@given(events=st.lists(EVENT, min_size=1, max_size=14), draw=st.data())
def test_incremental_equals_rebuild_equals_snapshot_equals_point_in_time(
    events: list[tuple[str, str, int, int]], draw: st.DataObject
) -> None:
    """Random events, delivered in random batches, orders and duplicates, applied at random increasing clocks
    (so windows are crossed between runs and some events are in the future when stored): the rows kept up
    incrementally equal a full recomputation, the snapshot of the last day and the point-in-time join."""
    with tempfile.TemporaryDirectory() as root:
        env = make_env(Path(root))
        deliveries, cuts = deliveries_for(env.feed, events, draw, END)
        bounds = [(a, b) for a, b in zip([0, *cuts], [*cuts, len(deliveries)], strict=True) if b > a]
        offsets = draw.draw(st.lists(st.integers(0, 12 * 86_400), min_size=len(bounds), max_size=len(bounds)))
        clocks = [END - timedelta(seconds=s) for s in sorted(offsets, reverse=True)]  # increasing, up to END
        for (a, b), clock in zip(bounds, clocks, strict=True):
            env.apply(deliveries[a:b], now=clock)
        env.store.advance(now=END)  # the schedule's run at the day's end

        kept = {u: features_only(r, env) for u, r in table(env).items()}
        rebuilt = {u: features_only(r, env) for u, r in env.reference(END).items()}
        assert kept == rebuilt

        env.store.snapshot(DAY)
        snap = {u: features_only(r, env) for u, r in table(env, "user_feature_snapshots").items()}
        users_by_end = {e[0] for e in events}
        assert set(snap) == users_by_end and snap == {u: kept[u] for u in users_by_end}

        labels = pa.table({"user_id": sorted(kept), "ts": [END] * len(kept)})
        pit = training_set(labels, store=env.store).to_pylist()
        assert {r["user_id"]: features_only(r, env) for r in pit} == kept


def _entry(name: str, source: str, aggregation: str, **more: str) -> str:
    lines = [f'name = "{name}"', f'source = "{source}"', f'aggregation = "{aggregation}"']
    lines += [f"{k} = {v}" if k == "event_types" else f'{k} = "{v}"' for k, v in more.items()]
    return "[[feature]]\n" + "\n".join(lines) + "\n"


# Every aggregation, all-time (kept as partials) and windowed (read from the window), on both sources.
EVERY_AGGREGATION = [
    _entry("s_count", "signals", "count"),
    _entry("s_todoist", "signals", "count", where="e.data->>'provider' = 'todoist'"),
    _entry("s_total_sum", "signals", "sum", field="data.tasks_total", type="BIGINT", event_types='["task.synced"]'),
    _entry("s_total_mean", "signals", "mean", field="data.tasks_total", type="BIGINT"),
    _entry("s_completed_min", "signals", "min", field="data.tasks_completed", type="BIGINT"),
    _entry("s_first_at", "signals", "min", field="occurred_at"),
    _entry("s_latest_total", "signals", "last", field="data.tasks_total", type="BIGINT"),
    _entry("s_latest_task", "signals", "last", field="data.task_id", type="VARCHAR"),
    _entry("s_tasks_distinct", "signals", "count_distinct", field="data.task_id"),
    _entry("s_total_sum_24h", "signals", "sum", field="data.tasks_total", type="BIGINT", window="24h"),
    _entry("s_completed_max_3d", "signals", "max", field="data.tasks_completed", type="BIGINT", window="3d"),
    _entry("f_shown", "feedback", "count", event_types='["recommendation.shown"]'),
    _entry("f_items_distinct", "feedback", "count_distinct", field="data.item_id"),
    _entry("f_items_distinct_2d", "feedback", "count_distinct", field="data.item_id", window="2d"),
    _entry("f_last_item", "feedback", "last", field="data.item_id", type="VARCHAR"),
    '[[feature]]\nname = "shown_per_signal"\naggregation = "ratio"\nnumerator = "f_shown"\ndenominator = "s_count"\n',
]
# A registry change between two batches, and the sources whose all-time partials it must rebuild.
REGISTRY_CHANGES = {
    "add an all-time signals feature": (
        [*EVERY_AGGREGATION, _entry("s_completed", "signals", "count", event_types='["task.completed"]')],
        ["signals"],
    ),
    "change a window": (
        [e.replace('window = "24h"', 'window = "12h"') for e in EVERY_AGGREGATION],
        [],
    ),
    "remove an all-time feedback feature": ([e for e in EVERY_AGGREGATION if "f_last_item" not in e], ["feedback"]),
    "change an all-time filter": (
        [e.replace("'todoist'", "'asana'") for e in EVERY_AGGREGATION],
        ["signals"],
    ),
}


@PROPERTY
@given(events=st.lists(EVENT, min_size=1, max_size=14), draw=st.data())
def test_partials_and_windows_equal_the_reference_for_every_aggregation_and_registry_change(
    events: list[tuple[str, str, int, int]], draw: st.DataObject
) -> None:
    """The batch path keeps all-time features as merged partials and reads windows only: after random
    batches, clocks, duplicates and one registry change, every row equals the whole-history reference,
    and the change rebuilt the partials of exactly the sources it touched."""
    change = draw.draw(st.sampled_from(sorted(REGISTRY_CHANGES)), label="change")
    entries, must_rebuild = REGISTRY_CHANGES[change]
    with tempfile.TemporaryDirectory() as root:
        before, after = Path(root) / "before.toml", Path(root) / "after.toml"
        before.write_text("\n".join(EVERY_AGGREGATION))
        after.write_text("\n".join(entries))
        env = make_env(Path(root), before)
        deliveries, cuts = deliveries_for(env.feed, events, draw, END)
        bounds = [(a, b) for a, b in zip([0, *cuts], [*cuts, len(deliveries)], strict=True) if b > a]
        offsets = draw.draw(st.lists(st.integers(0, 12 * 86_400), min_size=len(bounds), max_size=len(bounds)))
        clocks = [END - timedelta(seconds=s) for s in sorted(offsets, reverse=True)]
        switch = draw.draw(st.integers(1, len(bounds)), label="switch")
        for i, ((a, b), clock) in enumerate(zip(bounds, clocks, strict=True)):
            if i == switch:
                env = Env(FeatureStore(env.store.path, registry=load_registry(after)), env.staging, env.feed)
            result = env.apply(deliveries[a:b], now=clock)
            first = ["signals", "feedback"] if i == 0 else []
            assert result.refresh.partials_rebuilt == (must_rebuild if i == switch else first)
            assert result.health.inconsistent_users == []
        if switch == len(bounds):  # the change comes with the day's-end run instead of a batch
            env = Env(FeatureStore(env.store.path, registry=load_registry(after)), env.staging, env.feed)
        refresh, _ = env.store.advance(now=END)
        assert refresh.partials_rebuilt == (must_rebuild if switch == len(bounds) else [])
        kept = {u: features_only(r, env) for u, r in table(env).items()}
        assert kept == {u: features_only(r, env) for u, r in env.reference(END).items()}


LABEL = st.tuples(st.sampled_from(["u-1", "u-2", "u-3", "u-4"]), st.integers(0, 12 * 86_400_000))


@PROPERTY
@given(events=st.lists(EVENT, min_size=1, max_size=14), labels=st.lists(LABEL, min_size=1, max_size=8), draw=st.data())
def test_training_rows_from_partials_equal_the_reference_at_each_label(
    events: list[tuple[str, str, int, int]], labels: list[tuple[str, int]], draw: st.DataObject
) -> None:
    """The training join aggregates the history before the earliest label once and merges each label's
    later events into it; every row must equal the whole-history reference at that label's ts (labels
    before, between and on events, for users with and without events)."""
    mergeable = [e for e in EVERY_AGGREGATION if "count_distinct" not in e or "window" in e]
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "features.toml"
        path.write_text("\n".join(mergeable))
        env = make_env(Path(root), path)
        deliveries, _ = deliveries_for(env.feed, events, draw, END)
        env.apply(deliveries, now=END)
        times = [END - timedelta(milliseconds=ms) for _, ms in labels]
        times[0] = END - timedelta(milliseconds=events[0][2])  # one label exactly on an event
        table = pa.table({"user_id": [u for u, _ in labels], "ts": times})
        got = training_set(table, store=env.store).to_pylist()
        for row, user, ts in zip(got, table["user_id"].to_pylist(), times, strict=True):
            want = env.reference(ts, [user]).get(user)
            assert want is not None and features_only(row, env) == features_only(want, env), (user, ts)


# -- point in time ---------------------------------------------------------------------------


def test_no_leakage_an_event_one_microsecond_after_ts_is_excluded(env: Env) -> None:
    ts = datetime(2026, 6, 1, 12, tzinfo=UTC)
    f = env.feed
    env.apply(
        [
            f.event("at", "signals.task.synced", "u", ts, data_for("signals.task.synced", 1)),
            f.event(
                "after", "signals.task.synced", "u", ts + timedelta(microseconds=1), data_for("signals.task.synced", 9)
            ),
        ],
        now=ts + timedelta(hours=1),
    )
    labels = pd.DataFrame({"user_id": ["u", "u"], "ts": [ts, ts + timedelta(microseconds=1)], "label": [0, 1]})
    rows = training_set(labels, store=env.store).to_pylist()
    assert [r["label"] for r in rows] == [0, 1]  # label columns kept, in order
    assert [r["signal_count_total"] for r in rows] == [1, 2]
    assert [r["latest_tasks_completed"] for r in rows] == [1, 9]
    assert [r["last_signal_at"] for r in rows] == [ts, ts + timedelta(microseconds=1)]


def test_received_cutoff_excludes_events_that_arrived_after_ts(env: Env) -> None:
    """occurred before ts but stored by the stream after it: in the default join, out with received_cutoff."""
    ts = datetime.now(UTC) - timedelta(minutes=5)  # the feed stamps received_at = now
    env.apply([env.feed.event("late", "signals.task.completed", "u", ts - timedelta(hours=1))])
    labels = pd.DataFrame({"user_id": ["u"], "ts": [ts]})
    assert training_set(labels, store=env.store).to_pylist()[0]["signal_count_total"] == 1
    assert training_set(labels, store=env.store, received_cutoff=True).to_pylist()[0]["signal_count_total"] == 0


def test_labels_for_unknown_users_and_bad_labels(env: Env, tmp_path: Path) -> None:
    ts = datetime(2026, 6, 1, 12, tzinfo=UTC)
    env.apply([env.feed.event("a", "signals.task.completed", "u", ts)], now=ts)
    csv = tmp_path / "labels.csv"
    csv.write_text("user_id,ts,clicked\nu,2026-06-01T13:00:00Z,1\nnobody,2026-06-01T13:00:00Z,0\n")
    rows = training_set(csv, store=env.store).to_pylist()
    # A user with no events by ts has counts of 0 and no last values, as in user_features.
    assert [(r["user_id"], r["clicked"], r["signal_count_total"], r["last_signal_at"] is None) for r in rows] == [
        ("u", 1, 1, False),
        ("nobody", 0, 0, True),
    ]

    bad = tmp_path / "bad.csv"
    bad.write_text("user,ts\nu,2026-06-01T13:00:00Z\n")
    with pytest.raises(LabelsError, match="missing user_id"):
        training_set(bad, store=env.store)
    with pytest.raises(LabelsError, match="column ts is empty in 1 row"):
        training_set(pd.DataFrame({"user_id": ["u", "v"], "ts": [ts, None]}), store=env.store)
    with pytest.raises(LabelsError, match="names of features"):
        training_set(pd.DataFrame({"user_id": ["u"], "ts": [ts], "signal_count_7d": [1]}), store=env.store)
    with pytest.raises(LabelsError, match="does not exist"):
        training_set(tmp_path / "nope.parquet", store=env.store)


def test_naive_label_times_are_utc_and_ids_stay_text_whatever_the_process_zone(env: Env, tmp_path: Path) -> None:
    """A CSV with naive times and ids that look like numbers, read by the CLI in a process on India time."""
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    env.apply([env.feed.event("a", "signals.task.completed", "007", t0)], now=t0)
    env.apply([env.feed.event("b", "signals.task.completed", "007", t0 + timedelta(hours=3))], now=t0)
    labels = tmp_path / "naive.csv"
    labels.write_text("user_id,ts\n007,2026-06-01 13:00:00\n")
    out = tmp_path / "kol.parquet"
    cli = Path(sys.executable).parent / "feature-pipeline"
    proc_env = {**os.environ, "TZ": "Asia/Kolkata", "FEATURE_STORE_PATH": str(env.store.path)}
    done = subprocess.run(
        [str(cli), "training-set", str(labels), "--out", str(out)], env=proc_env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (row,) = pd.read_parquet(out).to_dict("records")
    assert row["user_id"] == "007", "leading zeros kept"
    assert row["ts"] == pd.Timestamp("2026-06-01 13:00", tz="UTC")
    assert row["signal_count_total"] == 1, "13:00 UTC sees the 12:00 event only"


def test_numeric_user_ids_in_labels_are_read_as_text_with_a_warning(env: Env, tmp_path: Path) -> None:
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    env.apply([env.feed.event("a", "signals.task.completed", "7", t0)], now=t0)
    labels = tmp_path / "ints.parquet"
    pd.DataFrame({"user_id": [7], "ts": [t0 + timedelta(hours=1)]}).to_parquet(labels)
    with pytest.warns(UserWarning, match="user_id holds int64, not text"):
        (row,) = training_set(labels, store=env.store).to_pylist()
    assert row["user_id"] == "7" and row["signal_count_total"] == 1


# -- the registry drives the schema ----------------------------------------------------------


def test_adding_a_feature_backfills_its_column_and_keeps_the_others(tmp_path: Path) -> None:
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    env = make_env(tmp_path)
    f = env.feed
    env.apply(
        [
            f.event("a", "signals.task.synced", "u", t0 - timedelta(days=2), data_for("signals.task.synced", 4)),
            f.event("b", "signals.task.synced", "u", t0 - timedelta(hours=1), data_for("signals.task.synced", 6)),
            f.event("c", "signals.task.completed", "v", t0),
        ],
        now=t0,
    )
    before = table(env)
    extended = tmp_path / "features.toml"
    extended.write_text(
        DEFAULT_FILE.read_text()
        + '\n[[feature]]\nname = "tasks_completed_max_30d"\nsource = "signals"\nevent_types = ["task.synced"]\n'
        'aggregation = "max"\nfield = "data.tasks_completed"\ntype = "BIGINT"\nwindow = "30d"\n'
        '\n[[feature]]\nname = "providers_distinct"\nsource = "signals"\naggregation = "count_distinct"\n'
        'field = "data.provider"\n'
    )
    env2 = Env(
        FeatureStore(env.store.path, registry=load_registry(extended)),
        env.staging,
        env.feed,
    )
    result = env2.apply([f.event("d", "feedback.recommendation.shown", "w", t0)], now=t0 + timedelta(minutes=1))
    assert result.refresh.rebuilt
    assert "added user_features.tasks_completed_max_30d BIGINT" in result.refresh.schema_changes
    rows = table(env2)
    assert rows["u"]["tasks_completed_max_30d"] == 6 and rows["v"]["tasks_completed_max_30d"] is None
    assert rows["u"]["providers_distinct"] == 1 and rows["w"]["providers_distinct"] == 0
    for user, old in before.items():  # the old columns are unchanged (windows did not move in that minute)
        assert features_only(rows[user], env) == features_only(old, env)
    assert result.health.inconsistent_users == []
    # The next run is incremental again.
    again = env2.apply([f.event("e", "signals.task.completed", "v", t0)], now=t0 + timedelta(minutes=2))
    assert not again.refresh.rebuilt and again.refresh.rows_written == 1


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('name = "x"\nsource = "signals"\naggregation = "sum"\n', "needs a field"),
        ('name = "x"\nsource = "signals"\naggregation = "sum"\nfield = "data.n"\n', "needs a type"),
        ('name = "x"\nsource = "signals"\naggregation = "mean"\nfield = "data.n"\ntype = "VARCHAR"\n', "numeric"),
        ('name = "x"\nsource = "signals"\naggregation = "count"\nwindow = "3 weeks"\n', "window must look like"),
        ('name = "x"\nsource = "signals"\naggregation = "count"\nevent_types = ["signals.task.synced"]\n', "prefix"),
        ('name = "user_id"\nsource = "signals"\naggregation = "count"\n', "reserved"),
        ('name = "x"\naggregation = "ratio"\nnumerator = "nope"\ndenominator = "rec_shown_7d"\n', "not a feature"),
        ('name = "x"\nsource = "signals"\naggregation = "count"\nwhere = "e.nope = 1"\n', "does not compile"),
        ('name = "signal_count_7d"\nsource = "signals"\naggregation = "count"\n', "defined twice"),
        (
            'name = "x"\nsource = "logs"\naggregation = "count"\n',
            r"feature #13 \('x'\) reads source 'logs', which is not a \[\[source\]\]; the sources are 'signals', "
            "'feedback'",
        ),
    ],
)
def test_bad_definitions_are_rejected_with_the_feature_named(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "features.toml"
    path.write_text(DEFAULT_FILE.read_text() + "\n[[feature]]\n" + entry)
    with pytest.raises(RegistryError, match=message) as info:
        load_registry(path)
    assert str(path) in str(info.value)


def test_where_filters_and_other_aggregations(tmp_path: Path) -> None:
    path = tmp_path / "features.toml"
    path.write_text(
        '[[feature]]\nname = "todoist_syncs"\nsource = "signals"\naggregation = "count"\n'
        "where = \"e.data->>'provider' = 'todoist'\"\n"
        '[[feature]]\nname = "tasks_sum"\nsource = "signals"\naggregation = "sum"\nfield = "data.tasks_total"\n'
        'type = "BIGINT"\nevent_types = ["task.synced"]\n'
        '[[feature]]\nname = "tasks_mean_1h"\nsource = "signals"\naggregation = "mean"\nfield = "data.tasks_total"\n'
        'type = "DOUBLE"\nwindow = "1h"\n'
        '[[feature]]\nname = "first_seen"\nsource = "feedback"\naggregation = "min"\nfield = "occurred_at"\n'
    )
    env = make_env(tmp_path / "s", path)
    t0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
    f = env.feed
    other = {"provider": "asana", "tasks_total": 10, "tasks_completed": 0}
    env.apply(
        [
            f.event("a", "signals.task.synced", "u", t0 - timedelta(hours=2), data_for("signals.task.synced", 1)),
            f.event("b", "signals.task.synced", "u", t0 - timedelta(minutes=5), other),
            f.event("c", "feedback.recommendation.shown", "u", t0 - timedelta(days=3)),
        ],
        now=t0,
    )
    row = table(env)["u"]
    assert row["todoist_syncs"] == 1 and row["tasks_sum"] == 14 and row["tasks_mean_1h"] == 10.0
    assert row["first_seen"] == t0 - timedelta(days=3)


def test_fingerprint_ignores_descriptions(tmp_path: Path) -> None:
    """Rewording a description must not rebuild every row; changing a window must."""
    base = load_registry()
    reworded = tmp_path / "a.toml"
    reworded.write_text(DEFAULT_FILE.read_text().replace("Signals of any type, all time.", "All signals."))
    rewindowed = tmp_path / "b.toml"
    rewindowed.write_text(DEFAULT_FILE.read_text().replace('window = "24h"', 'window = "12h"', 1))
    assert load_registry(reworded).fingerprint == base.fingerprint
    assert load_registry(rewindowed).fingerprint != base.fingerprint
