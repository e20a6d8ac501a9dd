"""A warm run worker on one machine with no service to install (what `feature-pipeline up` starts, unless `--spawn`).

Runs go to a Celery worker that keeps the code location imported, as in a deployment, but Celery's
queue is a folder (kombu's filesystem transport) and task states are files (Celery's file result
backend), both under DAGSTER_HOME. The instance stays on SQLite. Both need one disk, so this is for
one machine only; beyond it, deploy/dagster.yaml with Redis or RabbitMQ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

BROKER = "filesystem://"
QUEUE = "feature-pipeline-local"
MARKER = "# Written by `feature-pipeline up --warm`"  # unchanged since --warm became the default: older homes keep it
POLL_SECONDS = 0.1  # how often the worker looks for a new run in the queue folder


def _folder(home: Path) -> Path:
    return home / "celery"


def backend(home: Path) -> str:
    return f"file://{_folder(home) / 'results'}"


def transport_options(home: Path) -> dict[str, Any]:
    """kombu's filesystem transport: messages are files in one folder, read and written by every process."""
    folder = _folder(home)
    return {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),  # kombu's default is ./control in the working directory
        "store_processed": False,
        "polling_interval": POLL_SECONDS,
    }


def prepare(home: Path) -> None:
    for name in ("queue", "processed", "control", "results"):
        (_folder(home) / name).mkdir(parents=True, exist_ok=True, mode=0o700)


def celery_env(home: Path) -> dict[str, str]:
    """The variables `feature-pipeline worker` reads, pointing at this machine's folders."""
    return {
        "FEATURE_PIPELINE_CELERY_BROKER": BROKER,
        "FEATURE_PIPELINE_CELERY_BACKEND": backend(home),
        "FEATURE_PIPELINE_CELERY_QUEUE": QUEUE,
    }


def instance_config(single_box_yaml: Path, home: Path) -> str:
    """The project's dagster.yaml with runs sent at once to the local warm worker.

    No queued-run coordinator: the worker (concurrency 1) already runs one batch at a time, and the
    coordinator's dequeue loop would add up to a second to every batch."""
    config = yaml.safe_load(single_box_yaml.read_text())
    config.pop("run_queue", None)
    config["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    config["run_launcher"] = {
        "module": "dagster_celery.launcher",
        "class": "CeleryRunLauncher",
        "config": {
            "broker": BROKER,
            "backend": backend(home),
            "default_queue": QUEUE,
            "config_source": {"broker_transport_options": transport_options(home)},
        },
    }
    header = f"{MARKER} from {single_box_yaml}: runs on a warm local worker; `up --spawn` puts the original back.\n"
    return header + yaml.safe_dump(config, sort_keys=False)
