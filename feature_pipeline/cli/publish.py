"""`feature-pipeline publish`: sample events that follow the contract."""

from __future__ import annotations

import argparse
import asyncio
from datetime import timedelta

from feature_pipeline.broker.auth import redact
from feature_pipeline.broker.client import BrokerUnavailable
from feature_pipeline.cli.common import EXIT_OK, fail, load_settings
from feature_pipeline.envelopes import DATA_MODELS
from feature_pipeline.samples import publish_events


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def cmd_publish(args: argparse.Namespace) -> int:
    cfg = load_settings()
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
                auth=cfg.nats_auth,
                spread=timedelta(days=args.spread_days),
            )
        )
    except BrokerUnavailable as exc:
        return fail(str(exc))
    print(f"published {len(ids)} event(s) to {redact(cfg.nats_url)}" + (f": {ids[0]}" if len(ids) == 1 else ""))
    return EXIT_OK
