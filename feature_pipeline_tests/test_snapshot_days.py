"""Snapshot days cover the stored history: a new store that replays weeks of retained events can snapshot and
backfill every day of them, from the CLI and through the webserver's API the UI uses, with no restart; a day
outside the history is refused in words that name the first day and what to do."""

from __future__ import annotations

import subprocess
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from feature_pipeline.broker.local import port_open
from feature_pipeline.envelopes import make_envelope
from feature_pipeline.settings import Settings
from feature_pipeline.snapshot_days import days_between, register, yesterday
from feature_pipeline.store.feature_store import FeatureStore
from feature_pipeline.store.features import compute_features, day_end
from feature_pipeline.store.first_day import first_day_file
from feature_pipeline.testing import BIN, REPO, Pipeline, run, wait_for
from feature_pipeline_tests.helpers import definitions, publish, resources

TODAY = datetime.now(UTC).date()
USERS = ("ann", "ben", "cy")


def test_days_added_out_of_order_are_listed_in_day_order_and_keep_their_snapshots() -> None:
    """Dagster lists dynamic partitions in the order they were added: older days found later (older events
    arriving after the store was made) are put in front, and a day already snapshotted stays so."""

    @dg.asset(partitions_def=dg.DynamicPartitionsDefinition(name="snapshot_days"))
    def probe() -> None:
        return None

    with dg.instance_for_test() as inst:
        assert register(inst, "snapshot_days", ["2026-11-02", "2026-11-03"]) == ["2026-11-02", "2026-11-03"]
        assert dg.materialize([probe], instance=inst, partition_key="2026-11-03").success
        assert register(inst, "snapshot_days", days_between(date(2026, 10, 31), date(2026, 11, 3))) == [
            "2026-10-31",
            "2026-11-01",
        ]
        assert inst.get_dynamic_partitions("snapshot_days") == days_between(date(2026, 10, 31), date(2026, 11, 3))
        assert inst.get_materialized_partitions(probe.key) == {"2026-11-03"}
        assert register(inst, "snapshot_days", ["2026-11-01"]) == [], "nothing twice"


def _backfill(env: dict[str, str], *days: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "feature-pipeline"), "backfill-snapshots", *days, "--webserver", "http://127.0.0.1:9"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_day_outside_the_stored_history_is_refused_in_plain_words(tmp_path: Path) -> None:
    """Before any event: no day yet, and what to do. Then before the first day (named, with where it comes from
    and the setting that extends the range), and a day not over yet. Never Dagster's invariant text."""
    store = tmp_path / "store.duckdb"
    env = {"PATH": str(BIN), "FEATURE_STORE_PATH": str(store), "DAGSTER_HOME": str(tmp_path / "home")}
    empty = _backfill(env, "2026-11-01")
    assert empty.returncode == 2
    assert f"no snapshot day yet: no event is stored in {store}" in empty.stderr
    assert "FEATURE_PIPELINE_SNAPSHOT_START=YYYY-MM-DD" in empty.stderr

    first = TODAY - timedelta(days=40)
    first_day_file(store).write_text(first.isoformat() + "\n")  # what the store's writers keep
    early = TODAY - timedelta(days=45)
    refused = _backfill(env, early.isoformat(), (TODAY - timedelta(days=3)).isoformat())
    assert refused.returncode == 2 and "Invariant" not in refused.stderr and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (
        f"feature-pipeline: cannot backfill user_feature_snapshots {early}..{TODAY - timedelta(days=3)}: {early} is "
        f"before the first snapshot day, {first} (the day of the earliest event stored in {store}); request {first} "
        f"or later, or set FEATURE_PIPELINE_SNAPSHOT_START={early} to offer earlier days (their snapshots hold only "
        "the events stored before them)"
    )
    late = _backfill(env, TODAY.isoformat())
    assert late.returncode == 2 and f"the last snapshot day is yesterday, {yesterday()} (UTC)" in late.stderr
    accepted = _backfill(env, first.isoformat())
    assert "cannot backfill" not in accepted.stderr, "in range: it goes on to look for an instance"


def _shown(event_id: str, user: str, when: datetime) -> tuple[str, bytes]:
    data = {"recommendation_id": "r-1", "item_id": "i-1"}
    return "feedback.recommendation.shown", make_envelope(event_id, "recommendation.shown", user, when, data)


@pytest.mark.e2e
def test_a_new_store_fed_40_days_of_old_events_backfills_the_last_30_from_the_cli_and_the_ui_api(
    make_pipeline: Any,
) -> None:
    """A new store replays 40 days of retained events (one a day per user, at varied hours). The days appear
    without a restart; the last 30 are backfilled, half through the webserver's launchPartitionBackfill (what
    the UI's Materialize sends), half written into the instance by the CLI, and each day's snapshot equals the
    reference query at that day's end."""
    p: Pipeline = make_pipeline({}, webserver=True)
    history = [
        _shown(
            f"{u}-{k}", u, datetime.combine(TODAY - timedelta(days=k), datetime.min.time(), UTC) + timedelta(hours=h)
        )
        for k in range(1, 41)
        for h, u in enumerate(USERS, start=k % 5)
        if not (u == "cy" and k > 20)  # cy starts 20 days ago: the earlier snapshots do not have them
    ]
    run(publish(p.nats.url, history))
    wait_for(lambda: len(p.stored_ids()) == len(history), 120, "the 40 days of history to be stored")
    all_days = days_between(TODAY - timedelta(days=40), yesterday())
    with p.instance() as inst:
        wait_for(lambda: inst.get_dynamic_partitions("snapshot_days") == all_days, 30, "the days to be listed")
    last_30 = all_days[-30:]
    wait_for(lambda: port_open("127.0.0.1", p.webserver_port or 0), 60, "the webserver to listen")
    ui = p.cli("backfill-snapshots", last_30[0], last_30[14], "--webserver", p.webserver_url)
    assert ui.returncode == 0 and f"through the webserver at {p.webserver_url}" in ui.stdout, ui.stderr
    cli = p.cli("backfill-snapshots", last_30[15], last_30[-1], "--webserver", "http://127.0.0.1:9")
    assert cli.returncode == 0 and f"in the instance at {p.home}" in cli.stdout, cli.stderr
    for out in (ui, cli):
        _wait_backfill(p, out.stdout.split()[1].rstrip(":"))
    with p.instance() as inst:
        assert inst.get_materialized_partitions(dg.AssetKey("user_feature_snapshots")) == set(last_30)
    _assert_snapshots_equal_reference(p, last_30)


def _wait_backfill(p: Pipeline, backfill_id: str) -> None:
    def done() -> bool:
        with p.instance() as inst:
            backfill = inst.get_backfill(backfill_id)
        assert backfill is not None and backfill.status.value not in ("FAILED", "CANCELED"), backfill
        return backfill.status.value == "COMPLETED_SUCCESS"

    wait_for(done, 180, f"backfill {backfill_id} to complete")


def _assert_snapshots_equal_reference(p: Pipeline, days: list[str]) -> None:
    """Each day's rows equal compute_features at the day's end over the users with an event by then."""
    store = FeatureStore(p.db)
    con = store.connect(read_only=True)
    try:
        cur = con.execute("SELECT * FROM user_feature_snapshots")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        for key in days:
            day = date.fromisoformat(key)
            users = [u for u in USERS if u != "cy" or day >= TODAY - timedelta(days=20)]
            reference = compute_features(con, store.registry, day_end(day), users)
            got = {r["user_id"]: r for r in rows if r["snapshot_date"] == day}
            assert sorted(got) == sorted(reference) == sorted(users), key
            for user, row in got.items():
                shared = sorted(set(row) & set(reference[user]) - {"updated_at", "as_of", "snapshot_date"})
                assert len(shared) > 5 and {k: row[k] for k in shared} == {k: reference[user][k] for k in shared}, (
                    key,
                    user,
                )
    finally:
        con.close()


def test_the_schedule_lists_the_days_and_snapshots_yesterday_and_a_key_that_is_no_day_fails_in_words(
    settings: Settings,
) -> None:
    """The 00:15 schedule adds the days the history reaches (here from 5 days ago) and asks for yesterday; a
    partition added by hand in the UI that is not a snapshot day fails its run saying so."""
    first = TODAY - timedelta(days=5)
    first_day_file(settings.feature_store_path).write_text(first.isoformat() + "\n")
    defs = definitions(settings)
    schedule = defs.resolve_schedule_def("snapshot_job_schedule")
    at = datetime.combine(TODAY, datetime.min.time(), UTC) + timedelta(minutes=15)
    with dg.instance_for_test() as inst:
        with dg.build_schedule_context(
            instance=inst,
            scheduled_execution_time=at,
            resources=resources(settings),
            repository_def=defs.get_repository_def(),
        ) as ctx:
            (request,) = schedule.evaluate_tick(ctx).run_requests or []
        assert request.partition_key == (TODAY - timedelta(days=1)).isoformat()
        assert inst.get_dynamic_partitions("snapshot_days") == days_between(first, TODAY - timedelta(days=1))
        inst.add_dynamic_partitions("snapshot_days", ["not-a-day", first.isoformat()])
        job = defs.resolve_job_def("snapshot_job")
        failed = job.execute_in_process(instance=inst, partition_key="not-a-day", raise_on_error=False)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failure.step_failure_data.error is not None
    assert (
        "'not-a-day' is not a day: snapshot partitions are UTC days, YYYY-MM-DD"
        in failure.step_failure_data.error.message
    )
