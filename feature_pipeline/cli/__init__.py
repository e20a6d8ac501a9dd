"""`feature-pipeline`: bring the stack up, publish sample events, read features, check health."""

from __future__ import annotations

import argparse

from feature_pipeline.cli import archive, backfill, publish, reads, redrive, reshard, status, up, worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="feature-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (up, worker, publish, reads, backfill, redrive, archive, reshard, status):
        group.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))
