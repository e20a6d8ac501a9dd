"""`feature-pipeline reshard --to N`: change the number of shards, with ingestion paused (store.reshard)."""

from __future__ import annotations

import argparse
import asyncio

from feature_pipeline.broker import kv
from feature_pipeline.broker.auth import redact
from feature_pipeline.broker.client import Broker
from feature_pipeline.cli.common import EXIT_OK, fail, load_settings
from feature_pipeline.ingest import layout, shard_checks
from feature_pipeline.ingest.tick import open_every_staging
from feature_pipeline.settings import Settings
from feature_pipeline.store.reshard import ReshardError, reshard


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(
        "reshard",
        help="rebuild the stores of FEATURE_PIPELINE_SHARDS shards as --to shards (ingestion stopped first)",
    )
    cmd.add_argument("--to", type=int, required=True, help="the new number of shards (1-64)")
    cmd.set_defaults(func=cmd_reshard)


def cmd_reshard(args: argparse.Namespace) -> int:
    """Checks that nothing is in flight and that NATS answers before it moves a row; records the new layout
    beside the online store last."""
    cfg = load_settings()
    with open_every_staging(cfg) as stagings:
        staged = sum(len(s.batches()) for s in stagings.values())
    if staged:
        return fail(
            f"{staged} batch(es) are still staged: stop the ingest sensor (or `up`), let them settle (`health` shows "
            "0 in flight), then reshard"
        )
    try:
        recorded = asyncio.run(_recorded(cfg))
    except Exception as exc:  # NATS: the layout must be recorded there, so nothing is moved without it
        return fail(
            f"cannot reach NATS at {redact(cfg.nats_url)} to record the new layout: {type(exc).__name__}: {exc}"
        )
    if recorded is not None and recorded.get("shards") not in (cfg.shards, args.to):
        return fail(f"the pipeline records {recorded.get('shards')} shards, not FEATURE_PIPELINE_SHARDS={cfg.shards}")
    try:
        report = reshard(cfg, args.to)
    except ReshardError as exc:
        return fail(str(exc))
    asyncio.run(_record(cfg, args.to))
    print(report.summary(cfg.shards, args.to))
    print(
        f"new files: {', '.join(map(str, report.files))}; recorded {args.to} shard(s) beside the online store. Set "
        f"FEATURE_PIPELINE_SHARDS={args.to} everywhere and start again; the old files are kept: delete them once "
        "you have checked the new ones"
    )
    return EXIT_OK


async def _recorded(cfg: Settings) -> dict[str, object] | None:
    async with await Broker.connect(cfg.nats_url, "feature-pipeline-reshard", cfg.nats_auth) as broker:
        return await layout.recorded(broker, cfg)


async def _record(cfg: Settings, to: int) -> None:
    """The new layout, and the old shards' state keys gone: each new shard's first sync writes all its rows."""
    async with await Broker.connect(cfg.nats_url, "feature-pipeline-reshard", cfg.nats_auth) as broker:
        await layout.record(broker, cfg, to)
        bucket = kv.bucket_for(cfg.durable_prefix)
        old = [kv.state_key(k, cfg.shards) for k in range(cfg.shards) if cfg.shards > 1]
        await kv.delete_many(broker, bucket, [*old, *(shard_checks.checks_key(k) for k in range(cfg.shards))])
