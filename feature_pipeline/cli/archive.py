"""`feature-pipeline archive`: move raw events older than the horizon to day-partitioned Parquet."""

from __future__ import annotations

import argparse
import os
import signal
from datetime import timedelta
from pathlib import Path

from feature_pipeline import faults
from feature_pipeline.cli.common import EXIT_OK, add_shard, fail, load_settings
from feature_pipeline.shards import LayoutError, for_shard, local_shards
from feature_pipeline.store.archive import ArchiveError
from feature_pipeline.store.feature_store import FeatureStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("archive", help="move raw events older than FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS to Parquet")
    cmd.add_argument("--older-than-days", type=int, help="this horizon instead of FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS")
    cmd.add_argument("--dry-run", action="store_true", help="count what would be archived; move nothing")
    add_shard(cmd)
    cmd.set_defaults(func=cmd_archive)


def cmd_archive(args: argparse.Namespace) -> int:
    """Each shard on this host (or the one --shard names) archives its own raw events, into its own folder."""
    cfg = load_settings()
    days = args.older_than_days or cfg.archive_after_days
    kill = faults.ARCHIVE_KILL in faults.parse(cfg.faults)
    try:
        every = local_shards(cfg, args.shard)
    except (LayoutError, ValueError) as exc:
        return fail(str(exc))
    for shard in every:
        store = FeatureStore.from_settings(cfg, shard)
        try:
            result = store.archive(
                for_shard(cfg, shard).archive_path,
                timedelta(days=days),
                dry_run=args.dry_run,
                after_file=_kill_self if kill else None,
            )
        except ArchiveError as exc:
            return fail(str(exc))
        except Exception as exc:  # the store or the disk: say which, never a stack trace
            return fail(f"archive of {store.name} failed: {type(exc).__name__}: {exc}")
        print(result.summary() + (f" ({store.name})" if cfg.shards > 1 else ""))
    return EXIT_OK


def _kill_self(path: Path) -> None:
    """FEATURE_PIPELINE_FAULTS=archive-kill: die like a killed worker once the first file is on disk."""
    os.kill(os.getpid(), signal.SIGKILL)
