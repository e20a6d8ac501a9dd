"""`feature-pipeline backfill-snapshots`: ask the daemon for an asset backfill of daily snapshots.

The request is the one the UI's Materialize > Launch backfill makes. With a webserver running
(`up` starts one) it goes through the webserver's public GraphQL API (`launchPartitionBackfill`);
without one, it is written into the Dagster instance directly, through Dagster's private API: the
only use of it in the project, kept in `add_backfill_to_instance`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path
from typing import Any

from feature_pipeline import settings, shards, snapshot_days
from feature_pipeline.cli.common import EXIT_OK, dagster_home, fail, instance_missing, load_settings
from feature_pipeline.snapshot_days import available, days_between, refusal

SNAPSHOTS = "user_feature_snapshots"
_MUTATION = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on PartitionKeysNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    back = sub.add_parser("backfill-snapshots", help="backfill daily user_feature_snapshots (the daemon runs it)")
    back.add_argument("start", type=date.fromisoformat, help="first day, YYYY-MM-DD")
    back.add_argument("end", type=date.fromisoformat, nargs="?", help="last day (default: start)")
    back.add_argument(
        "--webserver",
        default="http://127.0.0.1:3000",
        help="the Dagster webserver to ask (default http://127.0.0.1:3000, where `up` serves it); when none "
        "answers there, the backfill is added to the instance at DAGSTER_HOME directly",
    )
    back.set_defaults(func=cmd_backfill_snapshots)


def cmd_backfill_snapshots(args: argparse.Namespace) -> int:
    cfg = load_settings()
    try:
        keys = partition_keys(args.start, args.end or args.start, cfg)
    except ValueError as exc:
        return fail(str(exc))
    title = f"{SNAPSHOTS} {keys[0]}..{keys[-1]}"
    home = dagster_home()
    missing = instance_missing(home)
    if missing is None:  # list the days first, so the webserver or the instance accepts them at once
        _register_days(home, cfg)
    for shard in range(cfg.shards):  # with shards, one backfill each, its runs sent to the shard's worker
        tags = shards.run_tags(cfg, shard)
        named = f"{title} (shard {shard})" if tags else title
        try:
            backfill_id = launch_via_webserver(args.webserver, keys, named, tags)
            how = f"through the webserver at {args.webserver}"
        except OSError:  # no webserver there: the instance itself
            if missing:
                return fail(missing)
            backfill_id = _launch_via_instance(home, keys, named, tags)
            how = f"in the instance at {home}"
        except RuntimeError as exc:
            return fail(str(exc))
        of = f" of shard {shard}" if tags else ""
        print(
            f"backfill {backfill_id}: {len(keys)} day(s) {keys[0]}..{keys[-1]}{of}, requested {how}; the daemon runs "
            "it (follow it in the UI under Runs > Backfills)"
        )
    return EXIT_OK


def partition_keys(start: date, end: date, cfg: settings.Settings) -> list[str]:
    """The snapshot days from start to end, or ValueError saying in words why they cannot be snapshotted."""
    refused = refusal(start, end, cfg)
    if refused:
        raise ValueError(f"cannot backfill {SNAPSHOTS} {start}..{end}: {refused}")
    return days_between(start, end)


def _register_days(home: Path, cfg: settings.Settings) -> None:
    """Add to the instance the snapshot days the store's history reaches (the code location does so on every
    ingest run and stream_monitor tick; a backfill asked for in between need not wait for it)."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        snapshot_days.register(instance, _snapshots().partitions_def.name, available(cfg))


def launch_via_webserver(
    url: str, keys: list[str], title: str, tags: dict[str, str] | None = None, timeout: float = 30.0
) -> str:
    """`launchPartitionBackfill`, as the UI sends it. OSError when no webserver answers at `url`."""
    params = {
        "assetSelection": [{"path": [SNAPSHOTS]}],
        "partitionNames": keys,
        "fromFailure": False,
        "title": title,
        "description": "requested with feature-pipeline backfill-snapshots",
        "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()],
    }
    body = json.dumps({"query": _MUTATION, "variables": {"params": params}}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # a webserver did answer, with an error
        raise RuntimeError(f"the webserver at {url} answered HTTP {exc.code}: {exc.read()[:500]!r}") from None
    result = (answer.get("data") or {}).get("launchPartitionBackfill") or {}
    if result.get("__typename") == "PartitionKeysNotFoundError":
        raise RuntimeError(
            f"the webserver at {url} does not list {keys[0]}..{keys[-1]} as snapshot days yet: the next ingest run "
            "or stream_monitor tick adds the days the stored history reaches; ask again after it"
        )
    if result.get("__typename") != "LaunchBackfillSuccess":
        raise RuntimeError(f"the webserver at {url} refused the backfill: {result or answer.get('errors')}")
    return str(result["backfillId"])


def _launch_via_instance(home: Any, keys: list[str], title: str, tags: dict[str, str]) -> str:
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        return add_backfill_to_instance(instance, keys, title, tags)


def add_backfill_to_instance(instance: Any, keys: list[str], title: str, tags: dict[str, str] | None = None) -> str:
    """The asset backfill the UI would create, written to the instance for its daemon to run.

    Dagster has no public Python call for this; these two private imports are the only ones in the
    project, and `feature_pipeline_tests` checks that the backfill they write is the one asked for.
    """
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    from feature_pipeline.definitions import defs

    snapshots = _snapshots()
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(),
        asset_graph=defs.resolve_asset_graph(),
        partition_names=keys,
        asset_selection=[snapshots.key],
        backfill_timestamp=time.time(),
        tags=tags or {},
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=title,
        description="requested with feature-pipeline backfill-snapshots",
        run_config=None,
    )
    instance.add_backfill(backfill)
    return str(backfill.backfill_id)


def _snapshots() -> Any:
    """The snapshot asset of this repository's code location."""
    import dagster as dg

    from feature_pipeline.definitions import defs

    return defs.resolve_assets_def(dg.AssetKey(SNAPSHOTS))
