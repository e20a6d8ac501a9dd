"""What the batch lifecycle needs from the orchestrator: the run that stores a batch, and how it ended.

The tick asks only these two questions, so it runs the same under the Dagster sensor (which
answers them from the instance's run records) and in tests (a dictionary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class BatchRun:
    run_id: str
    status: str  # a Dagster run status name: QUEUED, STARTED, SUCCESS, FAILURE, CANCELED, ...


class RunLookup(Protocol):
    def run_for(self, batch_id: str) -> BatchRun | None:
        """The run requested for a staged batch, or None when there is none (yet)."""
        ...

    def failure(self, run: BatchRun) -> str:
        """Why a failed or canceled run ended, in a line a person can read (it becomes a dead-letter reason)."""
        ...
