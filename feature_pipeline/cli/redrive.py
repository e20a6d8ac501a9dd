"""`feature-pipeline redrive`: publish dead letters' originals again, through the normal path."""

from __future__ import annotations

import argparse

from feature_pipeline.cli.common import EXIT_OK, add_shard, fail, load_settings
from feature_pipeline.ingest.redrive import RedriveFilter, parse_time, redrive


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("redrive", help="publish dead letters' originals again (skips those already redriven)")
    cmd.add_argument("--reason", default="", help="only dead letters whose reason contains this text (any case)")
    cmd.add_argument("--subject", default="", help="only these original subjects, a NATS pattern: signals.task.*")
    cmd.add_argument("--since", type=parse_time, help="dead-lettered at or after this time (ISO 8601, UTC if no zone)")
    cmd.add_argument("--until", type=parse_time, help="dead-lettered before this time")
    cmd.add_argument("--limit", type=int, default=0, help="at most this many, oldest first (0: all)")
    cmd.add_argument("--dry-run", action="store_true", help="list what would be redriven; publish nothing")
    add_shard(cmd)
    cmd.set_defaults(func=cmd_redrive)


def cmd_redrive(args: argparse.Namespace) -> int:
    cfg = load_settings()
    f = RedriveFilter(args.reason, args.subject, args.since, args.until, args.limit)
    try:
        report = redrive(cfg, f, dry_run=args.dry_run, shard=args.shard)
    except Exception as exc:  # NATS or the store unreachable: say which, never a stack trace
        return fail(f"redrive failed: {type(exc).__name__}: {exc}")
    for r in report.matched:
        print(f"{r['original_stream']} #{r['original_seq']} {r['original_subject']}: {r['reason']}")
    print(report.summary(args.dry_run))
    return EXIT_OK
