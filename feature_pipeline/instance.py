"""Where the Dagster instance is, and whether it exists yet: read without creating or migrating anything.

The CLI, `health_report()` and `up` share these; none of them imports Dagster for it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

DEFAULT_DAGSTER_HOME = "./data/dagster_home"


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).resolve()


# The SQLite databases a new instance with the default storage has, each stamped with its schema revision.
_SQLITE_DATABASES = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")


def instance_missing(home: Path) -> str | None:
    """Why there is no Dagster instance at `home` to read yet, or None when there is one. Read-only: a read
    command must never create or migrate the instance (two processes doing that at once can corrupt it).
    An instance on a database server (storage: postgres or mysql) is assumed made; its connect says if not."""
    config = home / "dagster.yaml"
    if not config.is_file():
        return (
            f"no Dagster instance at {home} (no dagster.yaml): `feature-pipeline up` creates it (or set DAGSTER_HOME)"
        )
    base = _sqlite_base(config, home)
    if base is None:
        return None
    for name in _SQLITE_DATABASES:
        if not _stamped(base / name):
            return f"the Dagster instance at {home} is not created yet ({name} missing): `feature-pipeline up` makes it"
    return None


def _sqlite_base(config: Path, home: Path) -> Path | None:
    """Where the instance keeps its SQLite databases, or None when its storage is a database server."""
    import yaml

    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return home  # unreadable here: the instance's own load will say what is wrong
    if any(k in data for k in ("run_storage", "event_log_storage", "schedule_storage")):
        return None
    storage = data.get("storage") or {"sqlite": {}}
    if "sqlite" not in storage:
        return None
    return Path((storage.get("sqlite") or {}).get("base_dir") or home)


def _stamped(db: Path) -> bool:
    """The database exists and its schema revision is recorded (its creation has finished)."""
    if not db.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)) as con:
            return bool(con.execute("SELECT count(*) FROM alembic_version").fetchone()[0])
    except sqlite3.Error:
        return False
