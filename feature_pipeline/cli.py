"""`feature-pipeline`: bring the stack up, publish sample events, read features, check health."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from feature_pipeline import settings
from feature_pipeline.broker import Broker, BrokerUnavailable, NatsAuth, redact
from feature_pipeline.envelopes import DATA_MODELS, make_envelope
from feature_pipeline.localnats import LocalNats, port_open
from feature_pipeline.staging import Staging
from feature_pipeline.store import FeatureStore, StoreBusy

DEFAULT_DAGSTER_HOME = "./data/dagster_home"
EXIT_OK, EXIT_DEGRADED, EXIT_DOWN = 0, 1, 2


def _fail(message: str, code: int = 2) -> int:
    print(f"feature-pipeline: {message}", file=sys.stderr)
    return code


def _settings() -> settings.Settings:
    try:
        return settings.load()
    except settings.SettingsError as exc:
        raise SystemExit(_fail(str(exc))) from None


def nats_auth(cfg: settings.Settings) -> NatsAuth:
    return NatsAuth(
        user=cfg.nats_user,
        password=cfg.nats_password,
        token=cfg.nats_token,
        creds=cfg.nats_creds,
        nkey_seed=cfg.nats_nkey_seed,
        tls_ca=cfg.nats_tls_ca,
        tls_cert=cfg.nats_tls_cert,
        tls_key=cfg.nats_tls_key,
    )


def _dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).resolve()


def prepare_dagster_home(home: Path, project: Path) -> None:
    """DAGSTER_HOME needs the instance config; copy the project's dagster.yaml unless one is there."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = home / "dagster.yaml"
    if not target.exists():
        shutil.copyfile(project / "dagster.yaml", target)


# -- up ----------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    project = Path.cwd()
    if not (project / "workspace.yaml").is_file() or not (project / "dagster.yaml").is_file():
        return _fail("run `feature-pipeline up` from the project folder (the one with workspace.yaml and dagster.yaml)")
    cfg = _settings()
    env = dict(os.environ)
    local: LocalNats | None = None
    first = urlparse(cfg.nats_url.split(",")[0])
    host, port = first.hostname or "127.0.0.1", first.port or 4222
    if port_open(host, port):
        print(f"using NATS at {redact(cfg.nats_url)}")
    elif host in ("127.0.0.1", "localhost", "::1"):
        local = LocalNats(project / "data" / "nats", port=port, log_file=str(project / "data" / "nats.log")).start()
        env["NATS_URL"] = local.url
        print(f"started a local nats-server with JetStream at {local.url} (store ./data/nats, log ./data/nats.log)")
    else:
        return _fail(f"NATS_URL={redact(cfg.nats_url)} does not answer; start it or unset NATS_URL for a local one")
    home = _dagster_home()
    prepare_dagster_home(home, project)
    env["DAGSTER_HOME"] = str(home)
    # Absolute paths, so the code server and run workers agree whatever their working directory.
    env["FEATURE_STORE_PATH"] = cfg.feature_store_path
    env["FEATURE_PIPELINE_STAGING_DIR"] = cfg.staging_dir
    env["FEATURE_PIPELINE_SERVING_PATH"] = cfg.serving_path
    if cfg.features_file:
        env["FEATURE_PIPELINE_FEATURES_FILE"] = cfg.features_file
    print(f"Dagster UI: http://{args.host}:{args.port}  (DAGSTER_HOME={home}); Ctrl-C stops everything")
    cmd = [
        str(Path(sys.executable).parent / "dagster"),
        "dev",
        "-w",
        str(project / "workspace.yaml"),
        "-h",
        args.host,
        "-p",
        str(args.port),
    ]
    print("then, in another shell: feature-pipeline publish --user u-42 && feature-pipeline features u-42")
    # Run from DAGSTER_HOME so dagster does not warn about the project's own dagster.yaml; in its own
    # process group so that Ctrl-C or a SIGTERM to this command stops the whole tree, NATS last.
    proc = subprocess.Popen(cmd, env=env, cwd=home, start_new_session=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return _stop_group(proc)
    finally:
        if local:
            local.stop()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 20.0) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


# -- publish -----------------------------------------------------------------------------------


def sample_data(subject: str, rng: random.Random) -> dict[str, Any]:
    if subject == "signals.task.synced":
        total = rng.randint(0, 40)
        return {"provider": rng.choice(["todoist", "asana", "linear"]), "tasks_total": total,
                "tasks_completed": rng.randint(0, total)}  # fmt: skip
    if subject == "signals.task.completed":
        return {"task_id": f"task-{rng.randint(1, 10_000)}"}
    if subject.startswith("feedback.recommendation."):
        return {"recommendation_id": f"rec-{uuid.uuid4().hex[:8]}", "item_id": f"item-{rng.randint(1, 500)}"}
    return {}


async def publish_events(
    url: str,
    *,
    subjects: list[str],
    users: list[str],
    count: int,
    rate: float | None,
    seed: int | None = None,
    auth: NatsAuth | None = None,
    spread: timedelta = timedelta(0),
) -> list[str]:
    """Publish `count` contract-conforming events; returns their ids. Each id is also the Nats-Msg-Id."""
    rng = random.Random(seed)
    ids: list[str] = []
    async with await Broker.connect(url, "feature-pipeline-publish", auth) as broker:
        await broker.ensure_streams()
        start = time.monotonic()
        pending = []
        for i in range(count):
            subject = rng.choice(subjects)
            event_id = f"evt-{uuid.uuid4().hex}"
            occurred = datetime.now(UTC) - spread * rng.random()
            body = make_envelope(
                event_id, subject.split(".", 1)[1], rng.choice(users), occurred, sample_data(subject, rng)
            )
            pending.append(await broker.js.publish_async(subject, body, headers={"Nats-Msg-Id": event_id}))
            ids.append(event_id)
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                pending.clear()
            if rate:
                ahead = (i + 1) / rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.gather(*pending)
                    pending.clear()
                    await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
    return ids


def cmd_publish(args: argparse.Namespace) -> int:
    cfg = _settings()
    users = [args.user] if args.user else [f"u-{i}" for i in range(1, args.users + 1)]
    subjects = [args.subject] if args.subject else sorted(DATA_MODELS)
    try:
        ids = asyncio.run(
            publish_events(
                cfg.nats_url,
                subjects=subjects,
                users=users,
                count=args.count,
                rate=args.rate,
                auth=nats_auth(cfg),
                spread=timedelta(days=args.spread_days),
            )
        )
    except BrokerUnavailable as exc:
        return _fail(str(exc))
    print(f"published {len(ids)} event(s) to {redact(cfg.nats_url)}" + (f": {ids[0]}" if len(ids) == 1 else ""))
    return EXIT_OK


# -- features ----------------------------------------------------------------------------------


def cmd_features(args: argparse.Namespace) -> int:
    cfg = _settings()
    try:
        row = FeatureStore(cfg.feature_store_path).user_features(args.user_id)
    except (FileNotFoundError, StoreBusy) as exc:
        return _fail(str(exc))
    if row is None:
        return _fail(f"no features for user {args.user_id!r} in {cfg.feature_store_path}", 1)
    print(json.dumps(row, default=str, indent=2))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from feature_pipeline.serving import ServingCopyMissing, get_features

    cfg = _settings()
    try:
        frame = get_features(args.user_ids, path=cfg.serving_path)
    except ServingCopyMissing as exc:
        return _fail(str(exc))
    print(frame.to_json(orient="records", date_format="iso", indent=2))
    return EXIT_OK


def cmd_training_set(args: argparse.Namespace) -> int:
    from feature_pipeline.training import LabelsError, training_set, write_table

    cfg = _settings()
    from feature_pipeline.registry import load_registry

    store = FeatureStore(cfg.feature_store_path, registry=load_registry(cfg.features_file or None))
    started = time.monotonic()
    try:
        table = training_set(args.labels, store=store, received_cutoff=args.received_cutoff)
        write_table(table, args.out)
    except (LabelsError, FileNotFoundError, StoreBusy, OSError) as exc:
        return _fail(str(exc))
    cutoff = " (events received after each ts excluded)" if args.received_cutoff else ""
    print(
        f"wrote {table.num_rows} rows x {table.num_columns} columns to {args.out} "
        f"in {time.monotonic() - started:.1f} s{cutoff}"
    )
    return EXIT_OK




def cmd_backfill_snapshots(args: argparse.Namespace) -> int:
    """Ask the daemon for an asset backfill of user_feature_snapshots, exactly as the UI's Materialize does."""
    import dagster as dg
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    from feature_pipeline.definitions import defs, snapshots

    start, end = args.start, args.end or args.start
    partitions = snapshots.partitions_def
    assert partitions is not None
    try:
        keys = partitions.get_partition_keys_in_range(dg.PartitionKeyRange(start.isoformat(), end.isoformat()))
    except Exception as exc:
        return _fail(f"{start}..{end} is not a range of user_feature_snapshots partitions: {exc}")
    home = _dagster_home()
    if not (home / "dagster.yaml").is_file():
        return _fail(f"no Dagster instance at {home}: run `feature-pipeline up` first (or set DAGSTER_HOME)")
    os.environ["DAGSTER_HOME"] = str(home)
    backfill_id = make_new_backfill_id()
    with dg.DagsterInstance.get() as instance:
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id=backfill_id,
            asset_graph=defs.resolve_asset_graph(),
            partition_names=keys,
            asset_selection=[snapshots.key],
            backfill_timestamp=time.time(),
            tags={},
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=f"user_feature_snapshots {keys[0]}..{keys[-1]}",
            description="requested with feature-pipeline backfill-snapshots",
            run_config=None,
        )
        instance.add_backfill(backfill)
    print(
        f"backfill {backfill_id}: {len(keys)} day(s) {keys[0]}..{keys[-1]}; the daemon runs it "
        f"(follow it in the UI under Runs > Backfills)"
    )
    return EXIT_OK


# -- health ------------------------------------------------------------------------------------


def _dagster_state() -> dict[str, Any] | None:
    """The last ingest run, the latest result of every asset check, and user_features freshness."""
    home = _dagster_home()
    if not (home / "dagster.yaml").exists():
        return None
    import dagster as dg  # slow import: only when a Dagster instance is there to ask

    from feature_pipeline.defs.checks import CONSISTENCY_CHECK, DEAD_LETTERS_CHECK, STREAM_CHECK_SPECS

    os.environ["DAGSTER_HOME"] = str(home)
    out: dict[str, Any] = {"last_ingest_run": {"status": "none yet"}, "checks": {}, "freshness": {}}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_run_records(filters=dg.RunsFilter(job_name="ingest"), limit=1)
        if records:
            run = records[0]
            out["last_ingest_run"] = {
                "run_id": run.dagster_run.run_id,
                "status": run.dagster_run.status.value,
                "ended_at": datetime.fromtimestamp(run.end_time, UTC).isoformat() if run.end_time else None,
            }
        keys = [s.key for s in (*STREAM_CHECK_SPECS, DEAD_LETTERS_CHECK, CONSISTENCY_CHECK)]
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
        for key in keys:
            rec = latest.get(key)
            evaluation = (
                rec.event.dagster_event.event_specific_data if rec and rec.event and rec.event.dagster_event else None
            )
            passed = getattr(evaluation, "passed", None)
            out["checks"][f"{key.asset_key.to_user_string()}:{key.name}"] = {
                "state": "never run" if passed is None else "passed" if passed else "failed",
                "severity": None if passed in (None, True) else evaluation.severity.value,
                "description": getattr(evaluation, "description", None),
                "at": datetime.fromtimestamp(rec.event.timestamp, UTC).isoformat() if rec and rec.event else None,
            }
        for key, state in instance.get_freshness_state_records([dg.AssetKey("user_features")]).items():
            out["freshness"][key.to_user_string()] = state.freshness_state.value
    return out


async def _stream_health(cfg: settings.Settings) -> list[dict[str, Any]]:
    from feature_pipeline.health import read_stream_stats

    batches = Staging(cfg.staging_dir).batches()
    stats = await read_stream_stats(
        cfg.nats_url, nats_auth(cfg), cfg.durable_prefix, batches, "feature-pipeline-health"
    )
    return [s.as_dict() for s in stats]


def cmd_health(args: argparse.Namespace) -> int:
    cfg = _settings()
    report: dict[str, Any] = {"nats_url": redact(cfg.nats_url), "status": "ok", "problems": []}
    code = EXIT_OK
    try:
        report["streams"] = asyncio.run(_stream_health(cfg))
    except BrokerUnavailable as exc:
        report.update(status="down", streams=[])
        report["problems"].append(str(exc))
        code = EXIT_DOWN
    except Exception as exc:  # a missing consumer or stream: the pipeline has not run yet, or was changed
        report.update(status="degraded", streams=[])
        report["problems"].append(f"cannot read stream state: {exc!r} (the sensor creates streams and consumers)")
        code = EXIT_DEGRADED
    try:
        Staging(cfg.staging_dir).check_writable()
    except OSError as exc:
        report["problems"].append(f"staging folder {cfg.staging_dir} is not writable, the sensor will not fetch: {exc}")
        code = max(code, EXIT_DEGRADED)
        report["status"] = "degraded" if code == EXIT_DEGRADED else report["status"]
    try:
        report.update(_dagster_state() or {"last_ingest_run": None, "checks": {}, "freshness": {}})
    except Exception as exc:
        report.update(last_ingest_run=None, checks={}, freshness={})
        report["problems"].append(f"cannot read the Dagster instance at {_dagster_home()}: {exc}")
        code = max(code, EXIT_DOWN)
    last = report.get("last_ingest_run") or {}
    degraded = []
    if last.get("status") in ("FAILURE", "CANCELED"):
        degraded.append(f"the last ingest run {last.get('run_id')} ended {last.get('status')}")
    for name, check in report["checks"].items():
        if check["state"] == "failed":
            degraded.append(f"check {name} failed ({check['severity']}): {check['description']}")
    for asset, state in report["freshness"].items():
        if state in ("WARN", "FAIL"):
            degraded.append(f"{asset} freshness is {state}")
    report["problems"].extend(degraded)
    if degraded and code == EXIT_OK:
        report["status"] = "degraded"
        code = EXIT_DEGRADED
    if code == EXIT_DOWN:
        report["status"] = "down"
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"status: {report['status']}  (NATS {report['nats_url']})")
        for s in report["streams"]:
            print(
                f"  {s['stream']:<10} lag {s['consumer_lag']:>8}  last message {s['last_message_at'] or 'never'}  "
                f"in flight {s['in_flight_batches']} batch(es)/{s['in_flight_messages']} msgs  "
                f"dead letters {s['dead_letters']}"
            )
        if report.get("last_ingest_run"):
            print(f"  last ingest run: {report['last_ingest_run']}")
        for name, check in report["checks"].items():
            severity = f" ({check['severity']})" if check["severity"] else ""
            print(f"  check {name}: {check['state']}{severity}")
        for asset, state in report["freshness"].items():
            print(f"  freshness {asset}: {state}")
        for p in report["problems"]:
            print(f"  problem: {p}")
    return code


def cmd_settings(_args: argparse.Namespace) -> int:
    cfg = _settings()
    for var in settings.VARIABLES:
        source = "env" if var.name in os.environ else "default"
        value = getattr(cfg, settings.FIELDS[var.name])
        shown = "***" if var.secret and value else redact(str(value)) if var.name == "NATS_URL" else value
        print(f"{var.name}={shown}  ({source})")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="feature-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start NATS (if none answers), the Dagster UI and daemon with the sensor on")
    up.add_argument("--host", default="127.0.0.1", help="webserver bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=3000)
    up.set_defaults(func=cmd_up)

    pub = sub.add_parser("publish", help="publish sample events")
    pub.add_argument("--user", help="one user id (default: --users synthetic users)")
    pub.add_argument("--users", type=int, default=10, help="how many synthetic users u-1..u-N")
    pub.add_argument("--subject", help=f"one subject (default: a mix of {', '.join(sorted(DATA_MODELS))})")
    pub.add_argument("--count", type=int, default=1)
    pub.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    pub.add_argument(
        "--spread-days", type=float, default=0.0, help="occurred_at spread at random over the last N days (default 0)"
    )
    pub.set_defaults(func=cmd_publish)

    feat = sub.add_parser("features", help="print one user's feature row")
    feat.add_argument("user_id")
    feat.set_defaults(func=cmd_features)

    serve = sub.add_parser("serve", help="current features from the serving copy (what get_features returns)")
    serve.add_argument("user_ids", nargs="+")
    serve.set_defaults(func=cmd_serve)

    train = sub.add_parser("training-set", help="point-in-time features for labels (user_id, ts, ...)")
    train.add_argument("labels", help="a .parquet or .csv file with columns user_id, ts and any label columns")
    train.add_argument("--out", required=True, help="output .parquet (or .csv)")
    train.add_argument(
        "--received-cutoff", action="store_true", help="also exclude events the stream received after each ts"
    )
    train.set_defaults(func=cmd_training_set)

    back = sub.add_parser("backfill-snapshots", help="backfill daily user_feature_snapshots (the daemon runs it)")
    back.add_argument("start", type=date.fromisoformat, help="first day, YYYY-MM-DD")
    back.add_argument("end", type=date.fromisoformat, nargs="?", help="last day (default: start)")
    back.set_defaults(func=cmd_backfill_snapshots)

    health = sub.add_parser("health", help="lag, last message, in-flight batches, dead letters, last run")
    health.add_argument("--json", action="store_true")
    health.set_defaults(func=cmd_health)

    sub.add_parser("settings", help="every configuration variable and its value").set_defaults(func=cmd_settings)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
