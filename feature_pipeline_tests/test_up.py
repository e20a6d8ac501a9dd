"""`feature-pipeline up`, as a user starts it: the instance config it writes, and `up` (warm by default) end to end
(dagster dev, a warm run worker on Celery's folder transport, no service besides its own NATS)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import yaml

from feature_pipeline.broker.local import LocalNats, free_port
from feature_pipeline.cli.common import prepare_dagster_home
from feature_pipeline.cli.up import _instance_config
from feature_pipeline.samples import publish_events
from feature_pipeline.shards import shard_of
from feature_pipeline.testing import BIN, REPO, Pipeline, kill_group, pool_children, query, run, wait_for
from feature_pipeline_tests.test_deploy import CELERY_TASK_TAG, SUBJECTS


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", folder / "dagster.yaml")
    return folder


def test_warm_sends_runs_to_the_local_worker_and_up_spawn_puts_the_original_back(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(project / "dagster.yaml", home / "dagster.yaml")
    assert _instance_config(home, project, warm=True) is None
    warm = yaml.safe_load((home / "dagster.yaml").read_text())
    single = yaml.safe_load((project / "dagster.yaml").read_text())
    assert warm["run_launcher"]["class"] == "CeleryRunLauncher"
    assert warm["run_launcher"]["config"]["config_source"]["broker_transport_options"]["data_folder_in"].startswith(
        str(home)
    )
    assert "run_queue" not in warm
    assert {k: v for k, v in warm.items() if k not in ("run_launcher", "run_coordinator")} == {
        k: v for k, v in single.items() if k != "run_queue"
    }
    assert _instance_config(home, project, warm=True) is None, "a second `up --warm` rewrites its own file"
    assert _instance_config(home, project, warm=False) is None
    assert (home / "dagster.yaml").read_text() == (project / "dagster.yaml").read_text()


def test_warm_never_replaces_an_instance_config_of_the_users_own(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    own = "storage:\n  postgres:\n    postgres_url: postgresql+psycopg2://me@db/dagster\n"
    (home / "dagster.yaml").write_text(own)
    problem = _instance_config(home, project, warm=True)
    assert problem and "is not a copy of" in problem and "`up --spawn`" in problem
    assert _instance_config(home, project, warm=False) is None
    assert (home / "dagster.yaml").read_text() == own


@pytest.mark.e2e
def test_up_stores_every_event_once_on_its_warm_worker_when_the_pool_is_killed_mid_run(
    tmp_path: Path, nats_server: LocalNats
) -> None:
    """The quick start (plain `up`, warm by default): runs go to the local warm worker; a run whose pool
    process is killed inside its transaction is failed by run monitoring (the task state is read from the
    file backend), its batch comes back and is stored once; SIGTERM stops dagster dev and the worker."""
    p = Pipeline(tmp_path / "p", {"FEATURE_PIPELINE_FAULTS": "slow-commit"}, nats=nats_server)
    log = tmp_path / "up.log"
    cmd = [str(BIN / "feature-pipeline"), "up", "--port", str(free_port())]
    port = cmd[-1]
    with open(log, "ab") as out:
        up = subprocess.Popen(cmd, cwd=REPO, env=p.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    worker_pid = 0
    try:
        started = wait_for(lambda: re.search(r"warm run worker: pid (\d+)", log.read_text()), 30, "the worker")
        worker_pid = int(started[1])
        published = run(publish_events(p.nats.url, subjects=SUBJECTS, users=["u-1", "u-2"], count=20, rate=None))
        killed = wait_for(lambda: p.runs(dg.DagsterRunStatus.STARTED), 120, "a run on the warm worker")[0]
        assert CELERY_TASK_TAG in killed.tags, "the run went to the Celery worker"
        (child,) = wait_for(lambda: pool_children(worker_pid), 10, "the worker's pool process")
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: p.run_status(killed.run_id) == dg.DagsterRunStatus.FAILURE, 60, "run monitoring to fail it")
        wait_for(lambda: sorted(p.stored_ids()) == sorted(published) and p.settled(), 120, "every event stored once")
        assert all(CELERY_TASK_TAG in r.tags for r in p.runs(dg.DagsterRunStatus.SUCCESS))
        up.send_signal(signal.SIGTERM)
        up.wait(90)
        assert not _alive(worker_pid), "stopping `up` stops its worker"
        assert not (REPO / "control").exists(), "Celery's folders stay under DAGSTER_HOME, not the working directory"
        assert "SupersessionWarning" not in log.read_text(), "up runs `dg dev`, not the superseded `dagster dev`"
    except BaseException:
        print(log.read_text(errors="replace")[-6000:])
        raise
    finally:
        kill_group(up)
        _kill_dg_dev(port)  # `up` runs it in a session of its own, which a SIGKILL of `up` does not reach
        if worker_pid and _alive(worker_pid):
            os.killpg(worker_pid, signal.SIGKILL)
        p.close()


@pytest.mark.e2e
def test_up_with_two_shards_runs_a_worker_each_and_the_commands_read_them_with_no_other_setting(
    tmp_path: Path, nats_server: LocalNats
) -> None:
    """FEATURE_PIPELINE_SHARDS=2 `up` on one box: a warm worker per shard, each user stored in its shard's file;
    `features`, `training-set` and `health` answer from the same environment. `up` with 3 is refused in words."""
    p = Pipeline(tmp_path / "p", {"FEATURE_PIPELINE_SHARDS": "2"}, nats=nats_server)
    log = tmp_path / "up.log"
    cmd = [str(BIN / "feature-pipeline"), "up", "--port", str(free_port())]
    port = cmd[-1]
    with open(log, "ab") as out:
        up = subprocess.Popen(cmd, cwd=REPO, env=p.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        workers = wait_for(lambda: re.findall(r"warm run worker \(shard (\d) of 2\): pid (\d+)", log.read_text()),
                           30, "the workers")  # fmt: skip
        assert sorted(w[0] for w in workers) == ["0", "1"]
        users = [f"u-{i}" for i in range(12)]
        published = run(publish_events(p.nats.url, subjects=SUBJECTS, users=users, count=60, rate=None))
        wait_for(lambda: sorted(p.stored_ids()) == sorted(published) and p.settled(), 120, "every event stored once")
        for shard, db in enumerate(p.stores):
            held = {u for (u,) in query(db, "SELECT user_id FROM user_features")}
            assert held and {shard_of(u, 2) for u in held} == {shard}, f"shard {shard} holds its users only"
        assert all(p.cli("features", u).returncode == 0 for u in users), "every user's row in the online store"
        labels = tmp_path / "labels.csv"
        labels.write_text("user_id,ts\n" + "".join(f"{u},{datetime.now(UTC).isoformat()}\n" for u in users))
        made = p.cli("training-set", str(labels), "--out", str(tmp_path / "ts.parquet"))
        assert made.returncode == 0 and f"wrote {len(users)} rows" in made.stdout, made.stderr
        health = wait_for(lambda: (h := p.cli("health")).returncode == 0 and h, 60, "health ok")
        assert "shard 1" in health.stdout
        up.send_signal(signal.SIGTERM)
        up.wait(90)
        refused = subprocess.run(cmd, cwd=REPO, env={**p.env, "FEATURE_PIPELINE_SHARDS": "3"}, capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        assert refused.returncode == 2 and "FEATURE_PIPELINE_SHARDS=3" in refused.stderr and "reshard" in refused.stderr
    except BaseException:
        print(log.read_text(errors="replace")[-6000:])
        raise
    finally:
        kill_group(up)
        _kill_dg_dev(port)
        for _, pid in re.findall(r"warm run worker \(shard (\d) of 2\): pid (\d+)", log.read_text()):
            if _alive(int(pid)):
                os.killpg(int(pid), signal.SIGKILL)
        p.close()


def _kill_dg_dev(port: str) -> None:
    """SIGKILL the process group of the `dg dev` serving this port, if `up` left it behind."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(args) > 2 and args[1].endswith(b"/dg") and b"dev" in args and port.encode() in args:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(entry.name), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_on_an_empty_dagster_home_always_comes_up_while_other_commands_use_it(
    tmp_path: Path, nats_server: LocalNats
) -> None:
    """The first start, raced: `up` on a DAGSTER_HOME that does not exist yet while `health --json` and
    `backfill-snapshots` (falling back to the instance) run against it in a loop. The read commands never
    create the instance, so `up` always gets past creating its storage and starts `dg dev`; nobody prints a
    traceback. Three rounds; each stops as soon as `up` has started `dg dev`."""
    for round_ in range(3):
        _first_start(tmp_path, nats_server.url, round_)


def _first_start(tmp_path: Path, nats_url: str, round_: int) -> None:
    """One round: `up` on a new DAGSTER_HOME, the read commands looping against it, until `up` starts dg dev.
    From the second round the home already holds dagster.yaml (as `up` leaves it just before it creates the
    storage, or as a user copies it): a read command that created the instance would race `up` at once."""
    home = tmp_path / f"home{round_}"
    if round_:
        prepare_dagster_home(home, REPO)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "FEATURE_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home),
        NATS_URL=nats_url,
        FEATURE_STORE_PATH=str(tmp_path / f"store{round_}.duckdb"),
        FEATURE_PIPELINE_STAGING_DIR=str(tmp_path / f"staging{round_}"),
    )
    stop = threading.Event()
    seen: list[str] = []
    readers = [threading.Thread(target=_use_in_a_loop, args=(cmd, env, stop, seen)) for cmd in _READERS]
    for reader in readers:
        reader.start()
    log, port = tmp_path / f"up{round_}.log", str(free_port())
    with open(log, "ab") as out:
        up = subprocess.Popen(
            [str(BIN / "feature-pipeline"), "up", "--port", port],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "Dagster UI:" in log.read_text() or up.poll() is not None, 60, "`up` to start dg dev")
        started = (
            log.read_text()
        )  # what `up` printed before it was stopped (dg dev stopped mid-import may not be quiet)
        assert up.poll() is None and "Dagster UI:" in started and "Traceback" not in started, started
    finally:
        stop.set()
        for reader in readers:
            reader.join(60)
        up.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            up.wait(60)
        kill_group(up)
        _kill_dg_dev(port)
    assert seen and not [s for s in seen if "Traceback" in s], [s for s in seen if "Traceback" in s][:1]


_YESTERDAY = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
_READERS = (
    ["health", "--json"],
    ["health"],
    ["backfill-snapshots", _YESTERDAY, "--webserver", "http://127.0.0.1:9"],
)


def _use_in_a_loop(cmd: list[str], env: dict[str, str], stop: threading.Event, seen: list[str]) -> None:
    """Run a read command against the instance until told to stop, keeping what each run printed."""
    while not stop.is_set():
        done = subprocess.run([str(BIN / "feature-pipeline"), *cmd], env=env, cwd=REPO, capture_output=True, text=True)
        seen.append(done.stdout + done.stderr)


_CREATE = """
import sys, time, pathlib
import dagster  # the slow import before the start line, so that the creations start together
from feature_pipeline.cli.up import create_storage
home, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
pathlib.Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.002)
print(create_storage(home) or "ok")
"""


def test_three_first_starts_at_the_same_instant_all_create_the_instance(tmp_path: Path) -> None:
    """Three processes create the storage of one new DAGSTER_HOME at the same instant (a start line they wait
    at after importing Dagster). Without the lock, plain `DagsterInstance.from_config` failed here in two of
    three rounds (`UNIQUE constraint failed: alembic_version.version_num`, `table run_tags already exists`);
    `create_storage` succeeds in every process, every round."""
    for round_ in range(3):
        home = tmp_path / f"home{round_}"
        prepare_dagster_home(home, REPO)
        go = tmp_path / f"go{round_}"
        ready = [tmp_path / f"ready{round_}-{i}" for i in range(3)]
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        procs = [
            subprocess.Popen(
                [str(BIN / "python"), "-c", _CREATE, str(home), str(go), str(r)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in ready
        ]
        wait_for(lambda: all(r.exists() for r in ready), 60, "the three processes at the start line", interval=0.05)  # noqa: B023
        go.touch()
        outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
        assert outputs == ["ok", "ok", "ok"], outputs
