"""Redrive: dead letters' originals published again after their cause was fixed, through the normal path,
once (recorded, skipped by later redrives), from the Python API, the Dagster job and the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from feature_pipeline.ingest.redrive import RedriveFilter, redrive, subject_regex
from feature_pipeline.settings import Settings
from feature_pipeline.testing import query, run
from feature_pipeline_tests.helpers import Lifecycle, changed, definitions, publish, stored_ids, synced


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("signals.task.synced", "signals.task.synced", True),
        ("signals.task.synced", "signals.task.syncedX", False),
        ("signals.*.synced", "signals.task.synced", True),
        ("signals.*", "signals.task.synced", False),
        ("signals.>", "signals.task.synced", True),
        ("signals.>", "signals", False),
        ("feedback.>", "signals.task.synced", False),
        ("a.b+c", "a.bbc", False),
    ],
)
def test_subject_patterns_follow_nats_wildcards(pattern: str, subject: str, matches: bool) -> None:
    assert bool(re.fullmatch(subject_regex(pattern), subject)) is matches


def test_redrive_after_the_cause_is_fixed_stores_the_events_once(settings: Settings, tmp_path: Path) -> None:
    broken = changed(settings, faults="fail-marked")
    run(publish(settings.nats_url, [synced("fail-1"), synced("evt-ok", "u-2"), ("signals.task.synced", b"{not json")]))
    Lifecycle(broken).drain(timeout=90)
    db = tmp_path / "store.duckdb"
    assert sorted(r[0][:14] for r in query(db, "SELECT reason FROM dead_letters")) == [
        "gave up after ",
        "not valid JSON",
    ]

    assert len(redrive(settings, RedriveFilter(), dry_run=True).matched) == 2
    assert redrive(settings, RedriveFilter(subject="feedback.>"), dry_run=True).matched == []
    dry = redrive(settings, RedriveFilter(reason="FAIL-MARKED"), dry_run=True)
    assert [r["original_seq"] for r in dry.matched] == [1] and dry.redriven == 0
    assert stored_ids(settings) == ["evt-ok"], "a dry run publishes nothing"

    job = definitions(settings).resolve_job_def("redrive_dead_letters")
    config = {"ops": {"redrive": {"config": {"reason": "fail-marked", "dry_run": False}}}}
    assert job.execute_in_process(run_config=config).success
    Lifecycle(settings).drain()
    assert sorted(stored_ids(settings)) == ["evt-ok", "fail-1"]
    assert query(db, "SELECT original_stream, original_seq, new_seq FROM redrives") == [("SIGNALS", 1, 4)]

    again = redrive(settings, RedriveFilter(reason="fail-marked"))
    assert again.matched == [] and again.redriven == 0, "a dead letter is redriven once"
    env = {
        **os.environ,
        "NATS_URL": settings.nats_url,
        "NATS_DURABLE_PREFIX": settings.durable_prefix,
        "FEATURE_STORE_PATH": settings.feature_store_path,
    }
    cli = [str(Path(sys.executable).parent / "feature-pipeline"), "redrive", "--dry-run", "--subject", "signals.>"]
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "SIGNALS #3 signals.task.synced: not valid JSON" in out.stdout
    assert out.stdout.strip().endswith("would redrive 1 dead letter(s)")
