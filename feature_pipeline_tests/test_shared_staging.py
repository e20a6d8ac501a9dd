"""Batches staged in NATS (FEATURE_PIPELINE_STAGING=nats): the sensor, the run and a later sensor may
each have their own disk. Real nats-server, real DuckDB file; each "host" here is its own scratch
folder, and no folder is read by anyone but its owner. (test_tick.py runs the whole lifecycle on
both stagings.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js.api import StreamInfo

from feature_pipeline.broker.client import Broker
from feature_pipeline.broker.local import LocalNats
from feature_pipeline.ingest.shared_staging import NatsStaging, StagedBatchMissing, open_staging
from feature_pipeline.settings import Settings
from feature_pipeline.testing import run
from feature_pipeline_tests.helpers import InMemoryRuns, Lifecycle, caught_up, changed, publish, stored_ids, synced
from feature_pipeline_tests.test_staging import signal


def _host(settings: Settings, tmp_path: Path, name: str, runs: InMemoryRuns) -> Lifecycle:
    """The lifecycle as seen from one host: its own scratch folder, the shared run lookup."""
    return Lifecycle(changed(settings, staging="nats", staging_dir=tmp_path / name), runs=runs)


async def stream_info(url: str, name: str) -> StreamInfo:
    async with await Broker.connect(url) as broker:
        return await broker.js.stream_info(name)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_the_run_and_a_later_sensor_need_no_disk_of_the_first(settings: Settings, tmp_path: Path) -> None:
    """Host A's sensor stages a batch; host B's run stores it from its own copy; host C's sensor (say, a
    code server restarted elsewhere) finds it in flight, keeps it alive and settles it."""
    runs = InMemoryRuns()
    a, b, c = (_host(settings, tmp_path, name, runs) for name in ("host-a", "host-b", "host-c"))
    run(publish(settings.nats_url, [synced("evt-1"), synced("evt-2", "u-2")]))
    (batch,) = a.tick().to_request
    assert _files(tmp_path / "host-a") == [], "the sensor keeps nothing of a committed batch on its disk"

    assert b.execute(batch), "the run on host B stores the batch from the object store"
    assert _files(tmp_path / "host-b") == [], "the run's copy is gone once it has stored the batch"

    report = c.tick()
    assert report.acked == 2 and report.settled_batches == 1 and report.problem is None
    assert caught_up(settings)
    assert sorted(stored_ids(settings)) == ["evt-1", "evt-2"]
    with open_staging(c.settings) as staging:
        assert staging.batches() == [], "a settled batch is forgotten"
        assert isinstance(staging, NatsStaging)
        info = run(stream_info(settings.nats_url, f"KV_{staging.kv_bucket}"))
        assert info.state.messages == 0, "and leaves no marker behind, so listing costs what is in flight"


def test_keep_alive_times_are_kept_with_the_batch(settings: Settings, tmp_path: Path) -> None:
    """The time of the last +WPI lives in NATS beside the batch, so another host sees it."""
    shared = changed(settings, staging="nats")
    with open_staging(changed(shared, staging_dir=tmp_path / "one")) as one:
        manifest = one.stage([signal(1, "evt-1")])
        first = one.kept_alive_at(manifest)
        one.mark_kept_alive(manifest.batch_id, first + 42.5)
    with open_staging(changed(shared, staging_dir=tmp_path / "two")) as two:
        assert two.batches() == [manifest]
        assert two.kept_alive_at(manifest) == first + 42.5
        assert two.manifest(manifest.batch_id) == manifest


def test_a_batch_whose_files_are_gone_is_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    shared = changed(settings, staging="nats")
    with open_staging(shared) as staging:
        assert isinstance(staging, NatsStaging)
        manifest = staging.stage([signal(1, "evt-1")])

        async def drop_files(broker: object) -> None:
            objects = await staging._objects(broker)  # type: ignore[arg-type]
            await objects.delete(f"{manifest.batch_id}/replies.parquet")

        staging._nats.call(drop_files)  # type: ignore[arg-type]
        with pytest.raises(StagedBatchMissing, match=f"staged batch {manifest.batch_id} has no replies.parquet"):
            list(staging.iter_deliveries(manifest.batch_id, ["reply"]))


def test_nats_down_then_back_the_batch_is_still_staged_and_stored_once(
    settings: Settings, nats_server: LocalNats
) -> None:
    """With batches staged in NATS, a tick cannot read them while NATS is down: it says so and asks for
    nothing; once NATS is back (file storage) the batch is there, gets its run and is settled."""
    life = Lifecycle(changed(settings, staging="nats"))
    run(publish(nats_server.url, [synced("evt-x")]))
    (batch,) = life.tick().to_request
    nats_server.kill()
    report = life.tick()
    assert report.problem and f"cannot reach NATS at {nats_server.url}" in report.problem
    assert report.to_request == []
    nats_server.start()
    report = life.tick()
    assert report.to_request == [batch], "the staged batch survived the restart and still needs its run"
    assert life.execute(batch)
    life.drain()
    assert stored_ids(settings) == ["evt-x"]
