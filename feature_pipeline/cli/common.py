"""What every command shares: the configuration, the Dagster home, exit codes and error output."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from feature_pipeline import settings

DEFAULT_DAGSTER_HOME = "./data/dagster_home"
EXIT_OK, EXIT_DEGRADED, EXIT_DOWN = 0, 1, 2


def fail(message: str, code: int = EXIT_DOWN) -> int:
    print(f"feature-pipeline: {message}", file=sys.stderr)
    return code


def load_settings() -> settings.Settings:
    """The configuration, or exit 2 with every problem named."""
    try:
        return settings.load()
    except settings.SettingsError as exc:
        raise SystemExit(fail(str(exc))) from None


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).resolve()


def prepare_dagster_home(home: Path, project: Path) -> None:
    """DAGSTER_HOME needs the instance config; copy the project's dagster.yaml unless one is there."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = home / "dagster.yaml"
    if not target.exists():
        shutil.copyfile(project / "dagster.yaml", target)
