"""`feature-pipeline archive`: move raw events older than the horizon to day-partitioned Parquet."""

from __future__ import annotations

import argparse
import os
import signal
from datetime import timedelta
from pathlib import Path

from feature_pipeline import faults
from feature_pipeline.cli.common import EXIT_OK, fail, load_settings
from feature_pipeline.store.archive import ArchiveError
from feature_pipeline.store.feature_store import FeatureStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("archive", help="move raw events older than FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS to Parquet")
    cmd.add_argument("--older-than-days", type=int, help="this horizon instead of FEATURE_PIPELINE_ARCHIVE_AFTER_DAYS")
    cmd.add_argument("--dry-run", action="store_true", help="count what would be archived; move nothing")
    cmd.set_defaults(func=cmd_archive)


def cmd_archive(args: argparse.Namespace) -> int:
    cfg = load_settings()
    days = args.older_than_days or cfg.archive_after_days
    kill = faults.ARCHIVE_KILL in faults.parse(cfg.faults)
    try:
        result = FeatureStore.from_settings(cfg).archive(
            cfg.archive_path, timedelta(days=days), dry_run=args.dry_run, after_file=_kill_self if kill else None
        )
    except ArchiveError as exc:
        return fail(str(exc))
    except Exception as exc:  # the store or the disk: say which, never a stack trace
        return fail(f"archive failed: {type(exc).__name__}: {exc}")
    print(result.summary())
    return EXIT_OK


def _kill_self(path: Path) -> None:
    """FEATURE_PIPELINE_FAULTS=archive-kill: die like a killed worker once the first file is on disk."""
    os.kill(os.getpid(), signal.SIGKILL)
