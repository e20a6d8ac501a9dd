"""What every command shares: the configuration, the Dagster home, exit codes and error output."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from feature_pipeline import settings
from feature_pipeline.instance import dagster_home as dagster_home
from feature_pipeline.instance import instance_missing as instance_missing

EXIT_OK, EXIT_DEGRADED, EXIT_DOWN = 0, 1, 2


def fail(message: str, code: int = EXIT_DOWN) -> int:
    print(f"feature-pipeline: {message}", file=sys.stderr)
    return code


def add_shard(cmd: argparse.ArgumentParser) -> None:
    """`--shard K`: one shard's store (on a host that holds only some), instead of every shard's."""
    cmd.add_argument("--shard", type=int, help="only this shard's store (default: every shard, all on this host)")


def load_settings() -> settings.Settings:
    """The configuration, or exit 2 with every problem named."""
    try:
        return settings.load()
    except settings.SettingsError as exc:
        raise SystemExit(fail(str(exc))) from None


def prepare_dagster_home(home: Path, project: Path) -> None:
    """DAGSTER_HOME needs the instance config; copy the project's dagster.yaml unless one is there."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = home / "dagster.yaml"
    if not target.exists():  # whole or not at all: a command reading it at this moment never sees half of it
        partial = home / f".dagster.yaml.{os.getpid()}"
        shutil.copyfile(project / "dagster.yaml", partial)
        os.replace(partial, target)


@contextlib.contextmanager
def instance_lock(home: Path) -> Iterator[None]:
    """Serialise creating the instance storage among this tool's processes (a file lock in DAGSTER_HOME)."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(home / ".feature-pipeline-create.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
