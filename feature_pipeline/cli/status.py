"""`feature-pipeline health | settings`: is the pipeline well, and with what configuration."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from datetime import UTC, datetime
from typing import Any

from feature_pipeline import settings
from feature_pipeline.broker.auth import redact
from feature_pipeline.broker.client import BrokerUnavailable
from feature_pipeline.cli.common import EXIT_DEGRADED, EXIT_DOWN, EXIT_OK, dagster_home, fail, load_settings
from feature_pipeline.ingest.shared_staging import open_staging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = sub.add_parser("health", help="lag, last message, in-flight batches, dead letters, last run")
    health.add_argument("--json", action="store_true")
    health.add_argument(
        "--prefix",
        default="",
        help="the Component instance to judge in the Dagster instance (its sensor, job and checks); its other "
        "values (NATS_URL, NATS_DURABLE_PREFIX, FEATURE_STORE_PATH, ...) come from the environment as usual",
    )
    health.set_defaults(func=cmd_health)
    sub.add_parser("settings", help="every configuration variable and its value").set_defaults(func=cmd_settings)


def cmd_settings(_args: argparse.Namespace) -> int:
    cfg = load_settings()
    for var in settings.VARIABLES:
        source = "env" if var.name in os.environ else "default"
        print(f"{var.name}={settings.shown(cfg, var)}  ({source})")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    if args.prefix:  # checked before anything is read; Dagster is imported only when one is given
        from feature_pipeline.defs.names import Names

        try:
            Names(args.prefix)
        except ValueError as exc:
            return fail(f"--prefix: {exc}")
    cfg = load_settings()
    report: dict[str, Any] = {"nats_url": redact(cfg.nats_url), "status": "ok", "problems": []}
    code = max(_streams(cfg, report), _staging(cfg, report), _dagster(cfg, report, args.prefix))
    code = max(code, _graded(report))
    report["status"] = {EXIT_OK: "ok", EXIT_DEGRADED: "degraded", EXIT_DOWN: "down"}[code]
    print(json.dumps(report, indent=2, default=str) if args.json else _text(report))
    return code


def _streams(cfg: settings.Settings, report: dict[str, Any]) -> int:
    from feature_pipeline.broker.stats import read_stream_stats

    report["streams"] = []
    try:
        with open_staging(cfg) as staging:
            in_flight = [m.counts for m in staging.batches()]
        stats = asyncio.run(
            read_stream_stats(cfg.nats_url, cfg.nats_auth, cfg.durable_prefix, in_flight, "feature-pipeline-health")
        )
    except BrokerUnavailable as exc:
        report["problems"].append(str(exc))
        return EXIT_DOWN
    except Exception as exc:  # a missing consumer or stream: the pipeline has not run yet, or was changed
        report["problems"].append(f"cannot read stream state: {exc!r} (the sensor creates streams and consumers)")
        return EXIT_DEGRADED
    report["streams"] = [s.as_dict() for s in stats]
    return EXIT_OK


def _staging(cfg: settings.Settings, report: dict[str, Any]) -> int:
    try:
        with open_staging(cfg) as staging:
            staging.check_writable()
    except OSError as exc:
        report["problems"].append(f"{staging.where} is not writable, the sensor will not fetch: {exc}")
        return EXIT_DEGRADED
    return EXIT_OK


def _dagster(cfg: settings.Settings, report: dict[str, Any], prefix: str) -> int:
    report.update(ingest_sensor=None, last_ingest_run=None, checks={}, freshness={}, retrying=[])
    try:
        report.update(_dagster_state(cfg, prefix) or {})
    except Exception as exc:
        report["problems"].append(f"cannot read the Dagster instance at {dagster_home()}: {exc}")
        return EXIT_DOWN
    return EXIT_OK


def _dagster_state(cfg: settings.Settings, prefix: str) -> dict[str, Any] | None:
    """The last ingest run, batches retried after failures outside their messages, the latest result of
    every asset check, and user_features freshness."""
    home = dagster_home()
    if not (home / "dagster.yaml").exists():
        return None
    import dagster as dg  # slow import: only when a Dagster instance is there to ask

    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        from feature_pipeline.defs.checks import Checks
        from feature_pipeline.defs.names import Names
        from feature_pipeline.defs.runs import DagsterRuns
        from feature_pipeline.ingest.tick import blocked_batches

        names = Names(prefix)
        checks = Checks(names)
        ingest = checks.ingest_graded(instance)[0]  # the same grade on every stream
        return {
            "ingest_sensor": {"ok": ingest["passed"], "description": ingest["description"]},
            "last_ingest_run": _last_run(instance, names.ingest_job),
            "retrying": blocked_batches(cfg, DagsterRuns(instance, names.ingest_job)),
            "checks": _checks(instance, checks),
            "freshness": {
                key.to_user_string(): state.freshness_state.value
                for key, state in instance.get_freshness_state_records([names.user_features]).items()
            },
        }


def _last_run(instance: Any, job_name: str) -> dict[str, Any]:
    """The sensor's last run for a staged batch: not a re-execution from the UI, not a window refresh."""
    import dagster as dg

    from feature_pipeline.defs.runs import BATCH_TAG

    records = instance.get_run_records(filters=dg.RunsFilter(job_name=job_name), limit=50)
    ours = [r for r in records if BATCH_TAG in r.dagster_run.tags and "dagster/parent_run_id" not in r.dagster_run.tags]
    if not ours:
        return {"status": "none yet"}
    run = ours[0]
    return {
        "run_id": run.dagster_run.run_id,
        "status": run.dagster_run.status.value,
        "ended_at": datetime.fromtimestamp(run.end_time, UTC).isoformat() if run.end_time else None,
    }


def _checks(instance: Any, checks: Any) -> dict[str, Any]:
    keys = [s.key for s in (*checks.stream_specs, checks.dead_letters, checks.consistency, checks.runs)]
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    out = {}
    for key in keys:
        rec = latest.get(key)
        event = rec.event if rec else None
        evaluation = event.dagster_event.event_specific_data if event and event.dagster_event else None
        passed = getattr(evaluation, "passed", None)
        severity = getattr(evaluation, "severity", None)
        out[f"{key.asset_key.to_user_string()}:{key.name}"] = {
            "state": "never run" if passed is None else "passed" if passed else "failed",
            "severity": None if passed in (None, True) or severity is None else severity.value,
            "description": getattr(evaluation, "description", None),
            "at": datetime.fromtimestamp(event.timestamp, UTC).isoformat() if event else None,
        }
    return out


def _graded(report: dict[str, Any]) -> int:
    """A failed last run, a batch waiting for a retry, a failed check or stale features: degraded."""
    last = report.get("last_ingest_run") or {}
    degraded = [f"not fetching; retrying {b}" for b in report["retrying"]]
    ingest = report.get("ingest_sensor")
    if ingest and not ingest["ok"]:
        degraded.append(ingest["description"])
    if last.get("status") in ("FAILURE", "CANCELED"):
        degraded.append(f"the last ingest run {last.get('run_id')} ended {last.get('status')}")
    for name, check in report["checks"].items():
        if check["state"] == "failed":
            degraded.append(f"check {name} failed ({check['severity']}): {check['description']}")
    for asset, state in report["freshness"].items():
        if state in ("WARN", "FAIL"):
            degraded.append(f"{asset} freshness is {state}")
    report["problems"].extend(degraded)
    return EXIT_DEGRADED if degraded else EXIT_OK


def _text(report: dict[str, Any]) -> str:
    lines = [f"status: {report['status']}  (NATS {report['nats_url']})"]
    for s in report["streams"]:
        lines.append(
            f"  {s['stream']:<10} lag {s['consumer_lag']:>8}  last message {s['last_message_at'] or 'never'}  "
            f"in flight {s['in_flight_batches']} batch(es)/{s['in_flight_messages']} msgs  "
            f"dead letters {s['dead_letters']}"
        )
    if report.get("ingest_sensor"):
        lines.append(f"  {report['ingest_sensor']['description']}")
    if report.get("last_ingest_run"):
        lines.append(f"  last ingest run: {report['last_ingest_run']}")
    for name, check in report["checks"].items():
        severity = f" ({check['severity']})" if check["severity"] else ""
        lines.append(f"  check {name}: {check['state']}{severity}")
    for asset, state in report["freshness"].items():
        lines.append(f"  freshness {asset}: {state}")
    lines += [f"  problem: {p}" for p in report["problems"]]
    return "\n".join(lines)
