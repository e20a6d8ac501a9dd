"""What the batch lifecycle needs from the orchestrator: the run that stores a batch, and how it ended.

The tick asks only these two questions, so it runs the same under the Dagster sensor (which
answers them from the instance's run records) and in tests (a dictionary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from feature_pipeline.ingest.failures import RunFailure


@dataclass(frozen=True)
class BatchRun:
    run_id: str
    status: str  # a Dagster run status name: QUEUED, STARTED, SUCCESS, FAILURE, CANCELED, ...
    attempt: int = 0  # 0 for the batch's first run, n for its n-th retry after an infrastructure failure
    ended_at: float | None = None  # epoch seconds, once the run has ended


class RunLookup(Protocol):
    def run_for(self, batch_id: str) -> BatchRun | None:
        """The latest run requested for a staged batch, or None when there is none (yet)."""
        ...

    def failure(self, run: BatchRun) -> RunFailure:
        """Why a failed or canceled run ended, and whether its messages caused it (see `failures`)."""
        ...
