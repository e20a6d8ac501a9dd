"""`feature-pipeline health | settings`: is the pipeline well, and with what configuration."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from feature_pipeline import settings
from feature_pipeline.cli.common import EXIT_OK, fail, load_settings
from feature_pipeline.report import build


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
    # The instance storage's own retry warnings: the report says what went wrong, once. Put back afterwards:
    # `main` may run inside another program (the tests call it), and `health_report()` never touches logging.
    silenced = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        result = build(load_settings(), args.prefix)
    finally:
        logging.disable(silenced)
    report, code = result.body, result.code
    print(json.dumps(report, indent=2, default=str) if args.json else _text(report), flush=True)
    if result.late:  # a part still waits on a connection that may never answer: do not wait for it at exit
        sys.stderr.flush()
        os._exit(code)
    return code


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
    online = report.get("online") or {}
    if "keys" in online:
        behind = online.get("behind_store_seconds")
        lines.append(
            f"  online store {online['bucket']}: {online['keys']} keys, valid as of {online['valid_as_of'] or 'never'}"
            + ("" if behind is None else f", {behind:.0f} s behind the store")
        )
    online_shards = {s["shard"]: s for s in online.get("shards", [])}
    for s in report.get("shards", []):
        clock = online_shards.get(s["shard"], {})
        behind = clock.get("behind_store_seconds")
        lines.append(
            f"  shard {s['shard']}: in flight {s['in_flight_batches']} batch(es)/{s['in_flight_messages']} msgs, "
            f"parked {s['parked_batches']}/{s['parked_messages']} msgs; online valid as of "
            f"{clock.get('valid_as_of') or 'never'}" + ("" if behind is None else f", {behind:.0f} s behind its store")
        )
    for name, check in report["checks"].items():
        severity = f" ({check['severity']})" if check["severity"] else ""
        lines.append(f"  check {name}: {check['state']}{severity}")
    for asset, state in report["freshness"].items():
        lines.append(f"  freshness {asset}: {state}")
    lines += [f"  problem: {p}" for p in report["problems"]]
    return "\n".join(lines)
