"""The health report: what `feature-pipeline health` prints and `feature_pipeline.health_report()` returns.

Four parts are read side by side, each bounded (NATS, the staging, the online store, the Dagster instance):
a partition must not make a monitoring probe hang. Each part adds its figures and the problems it found in
words; `_graded` then turns the instance's checks into problems, unless this report's own live read of the
same thing is newer. The exit code (0 ok, 1 degraded, 2 down) is the worst of the parts.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.errors import Error as NatsError

from feature_pipeline import settings, shards
from feature_pipeline.broker.auth import redact
from feature_pipeline.broker.client import BrokerUnavailable, nats_problem, not_created
from feature_pipeline.health import stream_checks, thresholds
from feature_pipeline.instance import dagster_home, instance_missing

EXIT_OK, EXIT_DEGRADED, EXIT_DOWN = 0, 1, 2
STATUS = {EXIT_OK: "ok", EXIT_DEGRADED: "degraded", EXIT_DOWN: "down"}
# The whole health report comes back within this, whatever does not answer (NATS, the instance's database,
# the staging folder); each part also has a timeout of its own where its client takes one.
HEALTH_SECONDS = 12.0
# libpq's connect timeout, for an instance on PostgreSQL whose URL sets none (PGCONNECT_TIMEOUT).
PG_CONNECT_TIMEOUT_SECONDS = "4"
HEALTH_CLIENT = "feature-pipeline-health"
_STREAM_CHECKS = ("consumer_lag", "oldest_unacked_age")
_RUNS_CHECK = "runs_not_failing_outside_messages"


@dataclass(frozen=True)
class Report:
    body: dict[str, Any]  # what `health --json` prints
    code: int  # 0 ok, 1 degraded, 2 down
    late: list[str]  # parts that had not answered within HEALTH_SECONDS (their threads may still wait)


def build(cfg: settings.Settings, prefix: str = "") -> Report:
    """The whole report, within about HEALTH_SECONDS whatever does not answer."""
    report: dict[str, Any] = {"nats_url": redact(cfg.nats_url), "status": "ok", "problems": []}
    home = dagster_home()
    parts: dict[str, Callable[[dict[str, Any]], int]] = {
        f"NATS at {redact(cfg.nats_url)}": lambda part: _streams(cfg, part),
        f"the staging at {cfg.staging_dir}": lambda part: _staging(cfg, part),
        f"the online store at {redact(cfg.nats_url)}": lambda part: _online(cfg, part),
        f"the Dagster instance at {home}": lambda part: _dagster(cfg, part, prefix),
    }
    code, late = _gather(report, parts)
    code = max(code, _graded(report))
    report["status"] = STATUS[code]
    return Report(report, code, late)


def health_report(prefix: str = "", cfg: settings.Settings | None = None) -> dict[str, Any]:
    """The report `feature-pipeline health --json` prints, as a dict, for a web app's own health endpoint:
    `status` is "ok", "degraded" or "down", `problems` says why in words. Configuration from the environment
    unless `cfg` is given; `prefix` names a Component instance. Returns within about HEALTH_SECONDS."""
    return build(cfg or settings.load(), prefix).body


def _gather(report: dict[str, Any], parts: dict[str, Callable[[dict[str, Any]], int]]) -> tuple[int, list[str]]:
    """Run the parts side by side and wait at most HEALTH_SECONDS in all: a partition must not make health
    hang. A part that has not answered by then is named as unreachable (exit 2); the others are reported."""
    done: dict[str, tuple[int, dict[str, Any]]] = {}

    def one(name: str, part_fn: Callable[[dict[str, Any]], int]) -> None:
        part: dict[str, Any] = {"problems": []}
        try:
            code = part_fn(part)
        except Exception as exc:  # a part's own failure, in a line: never a traceback
            part["problems"].append(f"cannot read {name}: {type(exc).__name__}: {exc}")
            code = EXIT_DOWN
        done[name] = (code, part)

    threads = [threading.Thread(target=one, args=item, daemon=True) for item in parts.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + HEALTH_SECONDS
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    code, late = EXIT_OK, []
    for name in parts:
        if name not in done:
            late.append(name)
            report["problems"].append(f"{name} did not answer within {HEALTH_SECONDS:.0f} s: unreachable")
            code = EXIT_DOWN
            continue
        part_code, part = done[name]
        report["problems"].extend(part.pop("problems"))
        report.update(part)
        code = max(code, part_code)
    report.setdefault("streams", [])
    report.setdefault("online", None)
    report.update({k: v for k, v in _empty_dagster().items() if k not in report})
    return code, late


def _empty_dagster() -> dict[str, Any]:
    """What the report says of the Dagster instance when it could not be read."""
    return {"ingest_sensor": None, "last_ingest_run": None, "checks": {}, "freshness": {}, "retrying": []}


def _streams(cfg: settings.Settings, report: dict[str, Any]) -> int:
    """The live figures of every stream; when NATS cannot give them, what is wrong, as what it is."""
    from feature_pipeline.broker.stats import read_stream_stats
    from feature_pipeline.ingest.tick import open_every_staging
    from feature_pipeline.store.loader import sources_for

    report["streams"] = []
    try:
        with open_every_staging(cfg) as stagings:
            in_flight = [m.counts for staging in stagings.values() for m in staging.batches()]
        stats = asyncio.run(
            asyncio.wait_for(
                read_stream_stats(
                    cfg.nats_url,
                    cfg.nats_auth,
                    cfg.durable_prefix,
                    sources_for(cfg.features_file),
                    in_flight,
                    HEALTH_CLIENT,
                ),
                HEALTH_SECONDS - 2,
            )
        )
    except (BrokerUnavailable, NatsError, TimeoutError, ConnectionError) as exc:
        if not_created(exc):  # degraded: nothing is ingested until the sensor has made them
            report["problems"].append(
                f"streams and consumers not created yet at NATS {redact(cfg.nats_url)}; the ingest sensor creates "
                "them on its first tick"
            )
            return EXIT_DEGRADED
        report["problems"].append(nats_problem(exc, cfg.nats_url))
        return EXIT_DOWN
    report["streams"] = [s.as_dict() for s in stats]
    report["streams_read_at"] = datetime.now(UTC).isoformat()
    report["stream_grades"] = [o.__dict__ for o in stream_checks(stats, thresholds(cfg))]
    return EXIT_OK


ONLINE_BEHIND_SECONDS = 60  # a run writes the KV right after its commit: further behind, a write failed


def _online(cfg: settings.Settings, report: dict[str, Any]) -> int:
    """The online store's bucket: its keys, each shard's last write and how far that is behind its store (read
    here when the store file is on this host and not held longer than a moment by a run), and the number of
    shards recorded beside it."""
    from nats.js.errors import NotFoundError

    from feature_pipeline.broker import kv
    from feature_pipeline.ingest import layout

    bucket = kv.bucket_for(cfg.durable_prefix)
    online: dict[str, Any] = {"bucket": bucket}
    report["online"] = online
    try:
        keys, states, recorded = asyncio.run(asyncio.wait_for(_bucket(cfg, bucket), HEALTH_SECONDS - 2))
    except NotFoundError:  # no bucket: a problem only once the store holds features it should have
        clocks = [_store_clock(cfg, k) for k in range(cfg.shards)]
        online.update(keys=0, valid_as_of=None, **clocks[0])
        if not any(c.get("store_valid_as_of") for c in clocks):
            online["note"] = "not created yet: the first ingest run creates it"
            return EXIT_OK
        report["problems"].append(f"online store {bucket} is missing while the store holds features: the next run "
                                  "writes every row")  # fmt: skip
        return EXIT_DEGRADED
    except (BrokerUnavailable, NatsError, TimeoutError, ConnectionError) as exc:
        # The same NATS as the streams': that part names the problem once; this one only fails the report.
        online["error"] = nats_problem(exc, cfg.nats_url)
        return EXIT_DOWN
    code = EXIT_OK
    refused = (layout.refused(recorded, cfg) if recorded else None) or shards.local_layout_problem(cfg)
    if refused:
        report["problems"].append(f"not ingesting: {refused}")
        code = EXIT_DEGRADED
    per = [_shard_online(cfg, k, states.get(k) or {}) for k in range(cfg.shards)]
    online.update(keys=keys, **{k: v for k, v in per[0].items() if k != "shard"})
    if cfg.shards > 1:  # the oldest shard's clock stands for the bucket; each shard's is listed
        online["valid_as_of"] = min((p["valid_as_of"] for p in per if p["valid_as_of"]), default=None)
        online["shards"] = per
    for p in per:
        behind = p.get("behind_store_seconds")
        if behind is not None and behind > ONLINE_BEHIND_SECONDS:
            of = f" for shard {p['shard']}" if cfg.shards > 1 else ""
            report["problems"].append(
                f"online store {bucket} is {behind:.0f} s behind the store{of} ({p.get('pending_rows')} rows wait "
                "to be written): the last run could not write it; the next run writes them"
            )
            code = max(code, EXIT_DEGRADED)
    return code


def _shard_online(cfg: settings.Settings, shard: int, state: dict[str, Any]) -> dict[str, Any]:
    """One shard's last write to the bucket, and how far behind its store that is (when its file is here)."""
    out: dict[str, Any] = {
        "shard": shard,
        "valid_as_of": state.get("valid_as_of"),
        "written_at": state.get("written_at"),
    }
    out.update(_store_clock(cfg, shard))
    ours, store = out["valid_as_of"], out.get("store_valid_as_of")
    if ours and store:
        behind = max(0.0, (datetime.fromisoformat(store) - datetime.fromisoformat(ours)).total_seconds())
        out["behind_store_seconds"] = round(behind, 1)
    return out


async def _bucket(
    cfg: settings.Settings, bucket: str
) -> tuple[int, dict[int, dict[str, Any] | None], dict[str, Any] | None]:
    """The bucket's user keys, each shard's last sync state, and the layout recorded there."""
    from feature_pipeline.broker import kv
    from feature_pipeline.broker.client import Broker
    from feature_pipeline.ingest import layout

    async with await Broker.connect(cfg.nats_url, HEALTH_CLIENT, cfg.nats_auth) as broker:
        stream = kv.stream_of(bucket)
        subjects = int((await broker.stream_state(stream)).get("num_subjects", 0))
        meta = await broker.subject_counts(stream, kv.subject_of(bucket, "meta.>"))
        states = {
            k: await kv.get_state(broker.nc, bucket, HEALTH_SECONDS - 2, kv.state_key(k, cfg.shards))
            for k in range(cfg.shards)
        }
        return max(0, subjects - len(meta)), states, await layout.recorded(broker, cfg)


def _store_clock(cfg: settings.Settings, shard: int = 0) -> dict[str, Any]:
    """A shard's clock and the rows not yet written to the KV; empty when its store is not readable here."""
    from feature_pipeline.store.db import StoreBusy, open_file
    from feature_pipeline.store.online import PENDING

    try:
        con = open_file(Path(shards.for_shard(cfg, shard).feature_store_path), read_only=True, wait_seconds=2)
    except (FileNotFoundError, StoreBusy):
        return {}
    try:
        row = con.execute("SELECT valid_as_of FROM feature_state WHERE id = 1").fetchone()
        pending = con.execute(f"SELECT count(DISTINCT user_id) FROM {PENDING}").fetchone()
    except Exception:  # a store older than the online store has no pending table: nothing to say
        return {}
    finally:
        con.close()
    as_of = row[0].astimezone(UTC).isoformat().replace("+00:00", "Z") if row and row[0] else None
    return {"store_valid_as_of": as_of, "pending_rows": int(pending[0]) if pending else 0}


def _staging(cfg: settings.Settings, report: dict[str, Any]) -> int:
    """Whatever makes the ingest sensor hold off fetching into the staging (the same rule it applies); with
    several shards, each shard's batches in flight and parked."""
    from feature_pipeline.ingest.fetch import staging_hold
    from feature_pipeline.ingest.tick import open_every_staging

    code, per = EXIT_OK, []
    with open_every_staging(cfg) as stagings:
        for shard, staging in stagings.items():
            hold = staging_hold(staging)
            if hold and code == EXIT_OK:
                report["problems"].append(f"the ingest sensor is not fetching: {hold}")
                code = EXIT_DEGRADED
            batches = staging.batches() if cfg.shards > 1 else []
            parked = [m for m in batches if m.parked]
            per.append(
                {
                    "shard": shard,
                    "in_flight_batches": len(batches) - len(parked),
                    "in_flight_messages": sum(m.size for m in batches if not m.parked),
                    "parked_batches": len(parked),
                    "parked_messages": sum(m.size for m in parked),
                }
            )
    if cfg.shards > 1:
        report["shards"] = per
    return code


def _dagster(cfg: settings.Settings, report: dict[str, Any], prefix: str) -> int:
    report.update(_empty_dagster())
    home = dagster_home()
    missing = instance_missing(home)
    if missing:
        report["dagster_instance"] = "not created yet"
        report["problems"].append(missing)
        return EXIT_DEGRADED
    os.environ.setdefault("PGCONNECT_TIMEOUT", PG_CONNECT_TIMEOUT_SECONDS)
    try:
        report.update(_dagster_state(cfg, prefix, home))
    except Exception as exc:
        report["problems"].append(f"cannot read the Dagster instance at {home}: {type(exc).__name__}: {_line(exc)}")
        return EXIT_DOWN
    return EXIT_OK


def _line(exc: BaseException) -> str:
    """The first line of an error's text: a database driver's message can run over several."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dagster_state(cfg: settings.Settings, prefix: str, home: Path) -> dict[str, Any]:
    """The last ingest run, batches retried after failures outside their messages, the latest result of
    every asset check, and user_features freshness."""
    import dagster as dg  # slow import: only when a Dagster instance is there to ask

    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        from feature_pipeline.defs.checks import Checks
        from feature_pipeline.defs.names import Names
        from feature_pipeline.defs.runs import DagsterRuns
        from feature_pipeline.ingest.tick import blocked_batches
        from feature_pipeline.store.loader import sources_for

        names = Names(prefix, sources_for(cfg.features_file))
        checks = Checks(names)
        ingest = checks.ingest_graded(instance)[0]  # the same grade on every stream
        return {
            "ingest_sensor": {"ok": ingest["passed"], "description": ingest["description"]},
            "last_ingest_run": _last_run(instance, names.ingest_job),
            "retrying": blocked_batches(cfg, DagsterRuns(instance, names.ingest_job)),
            "retrying_read_at": datetime.now(UTC).isoformat(),
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
    """A failed last run, a batch waiting for a retry, a failed check or stale features: degraded.

    A check evaluation older than this report's own live read of the same thing (the streams' figures, the
    batches waiting for a retry) is over: it is shown as superseded and the live read is graded instead."""
    last = report.get("last_ingest_run") or {}
    degraded = [f"not fetching; retrying {b}" for b in report["retrying"]]
    ingest = report.get("ingest_sensor")
    if ingest and not ingest["ok"]:
        degraded.append(ingest["description"])
    if last.get("status") in ("FAILURE", "CANCELED"):
        degraded.append(f"the last ingest run {last.get('run_id')} ended {last.get('status')}")
    for o in report.get("stream_grades", []):
        if o["grade"] != "pass":
            degraded.append(f"{o['stream']} {o['check']} ({o['grade'].upper()}, read now): {o['description']}")
    for name, check in report["checks"].items():
        live = _live_read_at(report, name)
        if check["state"] == "failed" and live and check["at"] and _before(check["at"], live):
            # Over: the live read above is graded instead, and the stale words are not repeated.
            check.update(state="superseded", severity=None, description=f"older than this report's live read at {live}")
        if check["state"] == "failed":
            degraded.append(f"check {name} failed ({check['severity']}): {check['description']}")
    for asset, state in report["freshness"].items():
        if state in ("WARN", "FAIL"):
            degraded.append(f"{asset} freshness is {state}")
    report["problems"].extend(p for p in degraded if p not in report["problems"])
    return EXIT_DEGRADED if degraded else EXIT_OK


def _before(earlier: str, later: str) -> bool:
    return datetime.fromisoformat(earlier) < datetime.fromisoformat(later)


def _live_read_at(report: dict[str, Any], check: str) -> str | None:
    """When this report read live what the check grades, if it did: stream checks, the runs check."""
    name = check.rsplit(":", 1)[-1]
    if name in _STREAM_CHECKS:
        return report.get("streams_read_at")
    if name == _RUNS_CHECK:
        return report.get("retrying_read_at")
    return None
