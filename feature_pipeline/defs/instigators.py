"""What the Dagster instance knows of the ingest sensor: its status and its last ticks.

Read through `DagsterInstance` methods and the enums' values, not Dagster's private enum classes.
"""

from datetime import UTC, datetime

import dagster as dg

from feature_pipeline.health import SensorState

TICKS_LOOKED_AT = 50  # a failing sensor's last completed tick may be a few failures back


def ingest_sensor_state(instance: dg.DagsterInstance, sensor: str) -> SensorState | None:
    """None until the daemon has recorded the sensor (it has never ticked nor been switched)."""
    states = [
        s
        for s in instance.all_instigator_state()
        if s.instigator_name == sensor and s.instigator_type.value == "SENSOR"
    ]
    if not states:
        return None
    state = states[0]
    ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=TICKS_LOOKED_AT)
    done = next((t for t in ticks if t.status.value in ("SUCCESS", "SKIPPED")), None)
    failure = None
    if ticks and ticks[0].status.value == "FAILURE" and ticks[0].error is not None:
        failure = ticks[0].error.message.strip().splitlines()[-1]
    return SensorState(
        running=state.status.value != "STOPPED",
        last_tick_at=datetime.fromtimestamp(done.timestamp, UTC) if done else None,
        last_failure=failure,
    )
