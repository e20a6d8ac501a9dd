"""`feature-pipeline publish`: sample events that follow the contract."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import timedelta
from typing import Any

from feature_pipeline.broker.auth import redact
from feature_pipeline.broker.client import BrokerUnavailable
from feature_pipeline.cli.common import EXIT_OK, fail, load_settings
from feature_pipeline.samples import SAMPLE_SUBJECTS, NotASourceSubject, publish_events
from feature_pipeline.store.loader import sources_for


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pub = sub.add_parser("publish", help="publish sample events")
    pub.add_argument("--user", help="one user id (default: --users synthetic users)")
    pub.add_argument("--users", type=int, default=10, help="how many synthetic users u-1..u-N")
    pub.add_argument("--subject", help=f"one subject (default: a mix of {', '.join(SAMPLE_SUBJECTS)})")
    pub.add_argument(
        "--data", help="the events' data as a JSON object (default: random values for the packaged subjects)"
    )
    pub.add_argument("--count", type=int, default=1)
    pub.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    pub.add_argument(
        "--spread-days", type=float, default=0.0, help="occurred_at spread at random over the last N days (default 0)"
    )
    pub.set_defaults(func=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    cfg = load_settings()
    users = [args.user] if args.user else [f"u-{i}" for i in range(1, args.users + 1)]
    subjects = [args.subject] if args.subject else list(SAMPLE_SUBJECTS)
    try:
        data = _data(args.data)
    except ValueError as exc:
        return fail(str(exc))
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
                sources=sources_for(cfg.features_file),
                data=data,
            )
        )
    except NotASourceSubject as exc:
        return fail(f"{exc} (feature registry {cfg.features_file or 'packaged'})")
    except BrokerUnavailable as exc:
        return fail(str(exc))
    print(f"published {len(ids)} event(s) to {redact(cfg.nats_url)}" + (f": {ids[0]}" if len(ids) == 1 else ""))
    return EXIT_OK


def _data(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--data is not valid JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(value, dict):
        raise ValueError(f'--data must be a JSON object, like \'{{"order_id": "o-1"}}\', got {type(value).__name__}')
    return value
