"""Archiving raw events to day-partitioned Parquet: every reader still sees them, once, and a killed
archive loses nothing. Real DuckDB files, real Parquet, the real CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from feature_pipeline import training_set
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.ingest.staging import FolderStaging
from feature_pipeline.settings import Settings
from feature_pipeline.store.archive import ArchiveError
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.loader import DEFAULT_FILE, load_registry
from feature_pipeline.testing import run
from feature_pipeline_tests.helpers import (
    SUBJECTS,
    Env,
    Feed,
    Lifecycle,
    caught_up,
    make_env,
    publish,
    redeliveries,
    synced,
)

NOW = datetime.now(UTC).replace(microsecond=0)
DAYS = 60  # of history, one batch per 10 days


def fill(env: Env) -> list[str]:
    """Three users' events over the last DAYS days, in six batches; returns the event ids."""
    ids = []
    for b in range(DAYS // 10):
        deliveries = []
        for i in range(30):
            ago = timedelta(days=DAYS - b * 10 - i / 3, minutes=i)
            event_id = f"e-{b}-{i}"
            ids.append(event_id)
            deliveries.append(env.feed.event(event_id, SUBJECTS[i % len(SUBJECTS)], f"u-{i % 3}", NOW - ago))
        env.apply(deliveries, now=NOW - timedelta(days=DAYS - b * 10 - 10))
    env.apply([env.feed.event("e-now", SUBJECTS[0], "u-0", NOW)], now=NOW)
    return [*ids, "e-now"]


def history(env: Env) -> list[str]:
    with env.con() as con:
        rows = con.execute(
            "SELECT event_id FROM signal_events_history UNION ALL SELECT event_id FROM feedback_events_history"
        ).fetchall()
    return sorted(r[0] for r in rows)


def live(env: Env) -> int:
    return env.count("signal_events") + env.count("feedback_events")


def reads(env: Env, day: date) -> dict[str, Any]:
    """What the store answers from the whole history: features now, a snapshot of `day`, a training set."""
    env.store.snapshot(day)
    labels = pa.table({"user_id": ["u-0", "u-1", "u-2"], "ts": [NOW - timedelta(days=d) for d in (45, 20, 1)]})
    return {
        "reference": env.reference(NOW),
        "snapshot": env.table("user_feature_snapshots", f"WHERE snapshot_date = DATE '{day}'"),
        "training": training_set(labels, store=env.store).to_pylist(),
    }


def test_archived_events_leave_the_live_tables_and_every_reader_still_sees_them(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    ids = fill(env)
    day = (NOW - timedelta(days=40)).date()
    before = reads(env, day)
    kept = env.features()

    result = env.store.archive(tmp_path / "archive", timedelta(days=30), now=NOW)
    assert result.cutoff == datetime.combine((NOW - timedelta(days=30)).date(), datetime.min.time(), UTC)
    assert sum(result.rows.values()) == len(ids) - live(env) > 50
    files = sorted((tmp_path / "archive").rglob("*.parquet"))
    assert len(files) == result.files and all(f.parent.name.startswith("day=") for f in files)
    assert history(env) == sorted(ids)  # all of them, once
    assert reads(env, day) == before and env.features() == kept

    # Incremental runs, a redelivered archived event, and a registry change all keep the reference.
    old = env.feed.event("e-0-0", SUBJECTS[0], "u-0", NOW - timedelta(days=DAYS), seq=1)
    again = env.apply([old, env.feed.event("e-next", SUBJECTS[1], "u-1", NOW)], now=NOW + timedelta(minutes=1))
    assert again.inserted == 1 and history(env) == sorted([*ids, "e-next"])
    extended = tmp_path / "features.toml"
    extended.write_text(
        DEFAULT_FILE.read_text()
        + '\n[[feature]]\nname = "first_signal_at"\nsource = "signals"\naggregation = "min"\nfield = "occurred_at"\n'
    )
    env2 = Env(FeatureStore(env.store.path, registry=load_registry(extended)), env.staging, env.feed)
    refresh, health = env2.store.advance(now=NOW + timedelta(minutes=2))
    assert refresh.partials_rebuilt == ["signals"]
    assert health.inconsistent_users == []
    first = {u: r["first_signal_at"] for u, r in env2.features().items()}
    assert min(first.values()) < result.cutoff  # computed from the archive
    assert env2.features() == env2.reference(NOW + timedelta(minutes=2))


def test_a_horizon_inside_the_longest_window_is_refused(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    fill(env)
    with pytest.raises(ArchiveError, match="longer than the longest feature window"):
        env.store.archive(tmp_path / "archive", timedelta(days=7), now=NOW)


def cli(tmp_path: Path, env: Env, *args: str, faults: str = "") -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "FEATURE_STORE_PATH": str(env.store.path),
        "FEATURE_PIPELINE_ARCHIVE_PATH": str(tmp_path / "archive"),
        "FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS": "30",
        "FEATURE_PIPELINE_FAULTS": faults,
    }
    command = [str(Path(sys.executable).parent / "feature-pipeline"), "archive", *args]
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=120)


def test_a_killed_archive_loses_nothing_and_the_next_one_finishes_it(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    ids = fill(env)
    kept = env.features()

    dry = cli(tmp_path, env, "--dry-run")
    assert dry.returncode == 0 and "would archive" in dry.stdout, dry.stderr
    foreign = tmp_path / "archive" / "someone-elses.parquet"  # not the archive's layout: never deleted
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"PAR1")
    killed = cli(tmp_path, env, faults="archive-kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    orphans = list((tmp_path / "archive").rglob("part-*.parquet"))
    assert len(orphans) == 1  # written, never listed
    assert history(env) == sorted(ids) and live(env) == len(ids)  # nothing moved, nothing doubled

    done = cli(tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert "removed 1 files of an unfinished run" in done.stdout
    assert not orphans[0].exists() and foreign.exists()
    assert history(env) == sorted(ids) and live(env) < len(ids)
    assert env.features() == kept

    again = cli(tmp_path, env)  # nothing left to move: idempotent
    assert again.returncode == 0 and "archived into 0 files" in again.stdout, again.stderr
    assert history(env) == sorted(ids)


def test_an_archived_event_published_again_is_acked_and_not_stored_twice(
    settings: Settings, lifecycle: Lifecycle
) -> None:
    """A producer's retry of an event weeks later, after the event went to the archive: through a real
    nats-server and the batch lifecycle, the copy is acked, not redelivered, and not stored or counted again."""
    data = {"provider": "todoist", "tasks_total": 3, "tasks_completed": 1}
    old = ("signals.task.synced", make_envelope("evt-old", "task.synced", "u-1", NOW - timedelta(days=60), data))
    run(publish(settings.nats_url, [old, synced("evt-new", "u-1")]))
    lifecycle.drain()
    store = FeatureStore.from_settings(settings)
    moved = store.archive(settings.archive_path, timedelta(days=30))
    assert moved.rows["signal_events"] == 1

    run(publish(settings.nats_url, [old]))  # no Nats-Msg-Id: JetStream stores it again, the store must not
    lifecycle.drain()
    assert caught_up(settings) and redeliveries(settings) == 0
    env = Env(store, FolderStaging(Path(settings.staging_dir)), Feed())
    assert history(env) == ["evt-new", "evt-old"]
    assert store.user_features("u-1")["signal_count_total"] == 2  # type: ignore[index]
