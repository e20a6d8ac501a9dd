"""The batch lifecycle's view of Dagster: which run stores a batch, and why a failed one failed.

Runs are found by polling run records tagged with the batch id rather than with a
run_status_sensor, whose cursor moves on even when its handler fails (the work would be lost).
"""

import dagster as dg

from feature_pipeline.ingest.runs import BatchRun

BATCH_TAG = "feature_pipeline/batch_id"
# The default run launcher cannot see a killed run worker; run monitoring fails runs past this tag.
MAX_RUNTIME_TAG = "dagster/max_runtime"
FAILURE_TEXT_LIMIT = 300


class DagsterRuns:
    """`RunLookup` over a Dagster instance."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance

    def run_for(self, batch_id: str) -> BatchRun | None:
        records = self.instance.get_run_records(filters=dg.RunsFilter(tags={BATCH_TAG: batch_id}), limit=1)
        if not records:
            return None
        run = records[0].dagster_run
        return BatchRun(run.run_id, run.status.value)

    def failure(self, run: BatchRun) -> str:
        if run.status == dg.DagsterRunStatus.CANCELED.value:
            return f"run {run.run_id} was canceled"
        conn = self.instance.get_records_for_run(
            run.run_id,
            of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE},
            ascending=True,
        )
        for record in conn.records:
            event = record.event_log_entry.dagster_event
            error = getattr(event.event_specific_data, "error", None) if event else None
            if error is not None:
                while error.cause is not None:  # Dagster wraps the asset's own exception; show that one
                    error = error.cause
                return f"run {run.run_id} failed: {' '.join(error.message.split())[:FAILURE_TEXT_LIMIT]}"
        return f"run {run.run_id} failed"


def batch_tags(batch_id: str, run_timeout_seconds: int) -> dict[str, str]:
    """The tags of the run that stores a batch."""
    return {BATCH_TAG: batch_id, MAX_RUNTIME_TAG: str(run_timeout_seconds)}
