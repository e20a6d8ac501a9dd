"""The Component in another Dagster project: a throwaway `dg` project with two instances, loaded by
`dg check defs`, storing one batch each from a real nats-server; and its attributes' errors."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from feature_pipeline import FeaturePipelineComponent, cli
from feature_pipeline.settings import SettingsError
from feature_pipeline.testing import BIN, LocalNats, Pipeline, consumer_states, query, run, wait_for
from feature_pipeline_tests.helpers import publish, synced

_PYPROJECT = """\
[project]
name = "demo"
version = "0.1.0"
dependencies = ["feature-pipeline"]

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "demo"
"""
_DEFINITIONS = """\
from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(project_root=Path(__file__).parent.parent.parent)
"""
# Two instances that store a batch, one per way of naming a variable: an `{env: …}` reference, and
# dg's template; the README's example is the third.
_ALPHA = """\
type: feature_pipeline.FeaturePipelineComponent
attributes:
  prefix: alpha
  nats_url: {env: DEMO_NATS_URL}
  max_deliver: 3
  consistency_every_seconds: 0
"""
_BETA = """\
type: feature_pipeline.FeaturePipelineComponent
attributes:
  prefix: beta
  nats_url: "{{ env('DEMO_NATS_URL') }}"
  sensor_interval_seconds: 10
"""


def _readme_yaml() -> str:
    """The defs.yaml of the README's section "In another Dagster project", as written there."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### In another Dagster project", 1)[1]
    return section.split("<<'YAML'\n", 1)[1].split("\nYAML\n", 1)[0] + "\n"


def _project(root: Path, *, readme: bool = True, extra: str = "") -> Path:
    """What `create-dagster project demo` makes, plus the defs.yaml files (`extra`: attributes for alpha
    and beta)."""
    package = root / "src" / "demo"
    instances = [("alpha", _ALPHA + extra), ("beta", _BETA + extra), *([("recs", _readme_yaml())] if readme else [])]
    for folder, text in instances:
        (package / "defs" / folder).mkdir(parents=True)
        (package / "defs" / folder / "defs.yaml").write_text(text)
    (root / "pyproject.toml").write_text(_PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    (package / "definitions.py").write_text(_DEFINITIONS)
    return root


def _dg(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    dg_cli = Path(sys.executable).parent / "dg"
    return subprocess.run(
        [str(dg_cli), *args], cwd=project, capture_output=True, text=True, timeout=180, env=os.environ.copy()
    )


def _load(project: Path, monkeypatch: pytest.MonkeyPatch) -> dg.Definitions:
    """The project's definitions, in this process. Every test's project is the package `demo`: one imported by
    an earlier test in this worker is forgotten first, or its folders would be loaded instead of this one's."""
    for name in [m for m in sys.modules if m == "demo" or m.startswith("demo.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(project / "src"))
    return dg.load_from_defs_folder(project_root=project)


def _store_one_batch(defs: dg.Definitions, prefix: str, instance: dg.DagsterInstance) -> str:
    """A tick of the instance's sensor, the run it asks for, and the tick that acks; the ack tick's words."""
    sensor = defs.resolve_sensor_def(f"{prefix}_ingest_sensor")
    resources = {f"{prefix}_pipeline": defs.resources[f"{prefix}_pipeline"]}
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        (request,) = sensor.evaluate_tick(ctx).run_requests or []
    job = defs.resolve_job_def(f"{prefix}_ingest")
    assert job.execute_in_process(instance=instance, tags=request.tags).success
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        settled = sensor.evaluate_tick(ctx)
    assert not settled.run_requests
    return settled.skip_message or ""


def test_two_instances_in_a_throwaway_project_load_with_dg_and_each_stores_a_batch_once(
    tmp_path: Path, nats_server: LocalNats, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _project(tmp_path / "demo")
    monkeypatch.setenv("DEMO_NATS_URL", nats_server.url)
    monkeypatch.setenv("NATS_PASSWORD", "the README's instance reads it")
    checked = _dg(project, "check", "defs")
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    defs = _load(project, monkeypatch)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    for prefix in ("alpha", "beta", "recs"):
        assert {f"{prefix}/user_features", f"{prefix}/nats/signals", f"{prefix}/user_feature_snapshots"} <= keys
        assert defs.resolve_assets_def(dg.AssetKey([prefix, "user_features"])).op.pool == f"{prefix}_duckdb"
        assert defs.resolve_job_def(f"{prefix}_ingest").name == f"{prefix}_ingest"
    assert not {"user_features", "ingest"} & keys, "a prefixed instance has no unprefixed name"

    run(publish(nats_server.url, [synced("evt-a"), synced("evt-b", "u-2")]))
    alpha_db, beta_db = (project / "data" / p / "feature_store.duckdb" for p in ("alpha", "beta"))
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")  # the default instance: SQLite under this folder
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert "acked 2" in _store_one_batch(defs, "alpha", instance)
        assert query(alpha_db, "SELECT event_id FROM signal_events ORDER BY 1") == [("evt-a",), ("evt-b",)]
        assert not beta_db.exists(), "the beta instance has its own store and has not ticked yet"
        # Its own durable consumer (feature-pipeline-beta-…) gets the stream's messages too, and its own runs.
        assert "acked 2" in _store_one_batch(defs, "beta", instance)
        runs = {r.job_name: r.run_id for r in instance.get_runs()}
    assert set(runs) == {"alpha_ingest", "beta_ingest"}
    assert (
        _health(monkeypatch, capsys, home, nats_server.url, project, "alpha")["last_ingest_run"]["run_id"]
        == (runs["alpha_ingest"])
    )
    assert _health(monkeypatch, capsys, home, nats_server.url, project, "")["last_ingest_run"] == {"status": "none yet"}
    for db in (alpha_db, beta_db):
        assert query(db, "SELECT user_id, COUNT(*) FROM signal_events GROUP BY 1 ORDER BY 1") == [
            ("u-1", 1),
            ("u-2", 1),
        ]


def _health(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    home: Path,
    url: str,
    project: Path,
    prefix: str,
) -> dict[str, Any]:
    """`feature-pipeline health --prefix …` with the instance's values in the environment."""
    data = project / "data" / (prefix or "alpha")
    monkeypatch.delenv("NATS_PASSWORD", raising=False)  # the README instance's; these instances have no user
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("NATS_URL", url)
    monkeypatch.setenv("NATS_DURABLE_PREFIX", f"feature-pipeline-{prefix or 'alpha'}")
    monkeypatch.setenv("FEATURE_STORE_PATH", str(data / "feature_store.duckdb"))
    monkeypatch.setenv("FEATURE_PIPELINE_STAGING_DIR", str(data / "staging"))
    cli.main(["health", "--json", *(["--prefix", prefix] if prefix else [])])
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def test_a_reference_to_an_unset_variable_fails_the_load_naming_attribute_and_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DEMO_NOT_SET", raising=False)
    component = FeaturePipelineComponent.resolve_from_yaml("prefix: recs\nnats_password: {env: DEMO_NOT_SET}\n")
    with pytest.raises(SettingsError, match=r"prefix 'recs'.*nats_password names DEMO_NOT_SET, which is not set"):
        component.definitions()


def test_a_secret_written_into_the_yaml_is_refused(tmp_path: Path) -> None:
    """A password written in the YAML (or by dg's template, which reads it at load) would be shown in the UI."""
    component = FeaturePipelineComponent.resolve_from_yaml("prefix: recs\nnats_user: u\nnats_password: hunter2\n")
    with pytest.raises(SettingsError, match=r"nats_password is a secret: give it as \{env: NAME\}") as caught:
        component.definitions(tmp_path)
    assert "hunter2" not in str(caught.value)


def test_a_bad_value_fails_the_load_naming_the_instance_and_variable(tmp_path: Path) -> None:
    component = FeaturePipelineComponent.resolve_from_yaml("prefix: recs\nmax_deliver: 0\n")
    with pytest.raises(SettingsError, match=r"prefix 'recs'.*NATS_MAX_DELIVER must be between 1 and 100, got 0"):
        component.definitions(tmp_path)


def test_a_prefix_that_cannot_name_dagster_objects_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prefix must be lowercase letters"):
        FeaturePipelineComponent.resolve_from_yaml("prefix: Recs-1\n").definitions(tmp_path)


def test_credentials_stay_references_and_paths_resolve_against_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resource holds `EnvVar(NAME)` for a reference (the UI shows the name, each run reads its own
    environment); a prefixed instance's files default under data/<prefix>/ of the project."""
    monkeypatch.setenv("DEMO_PASSWORD", "s3cret")
    yaml = "prefix: recs\nnats_user: feeder\nnats_password: {env: DEMO_PASSWORD}\narchive_path: cold/recs\n"
    component = FeaturePipelineComponent.resolve_from_yaml(yaml)
    values = component.resource_values(tmp_path)
    assert values["nats_password"] == dg.EnvVar("DEMO_PASSWORD")
    assert values["feature_store_path"] == str(tmp_path.resolve() / "data" / "recs" / "feature_store.duckdb")
    assert values["archive_path"] == str(tmp_path.resolve() / "cold" / "recs")
    assert values["durable_prefix"] == "feature-pipeline-recs"
    defs = component.definitions(tmp_path)
    with dg.build_resources({"recs_pipeline": defs.resources["recs_pipeline"]}) as res:
        assert res.recs_pipeline.settings.nats_password == "s3cret"


@pytest.mark.e2e
def test_two_instances_under_the_real_daemon_store_apart_and_a_stopped_one_is_named(
    tmp_path: Path, nats_server: LocalNats, make_pipeline: Any
) -> None:
    """The throwaway project as its own code location under dagster-daemon: each instance's sensor requests
    its own runs, which store every event once in its own store; stopping alpha_ingest_sensor turns alpha's
    ingest_running red naming it, within two monitor ticks, while beta's stays green."""
    project = _project(tmp_path / "demo", readme=False, extra="  monitor_interval_seconds: 10\n")
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        f"load_from:\n  - python_module:\n      module_name: demo.definitions\n"
        f"      working_directory: {project / 'src'}\n      location_name: demo\n"
    )
    p = make_pipeline({"DEMO_NATS_URL": nats_server.url}, nats=nats_server, workspace=workspace)
    run(publish(nats_server.url, [synced("evt-a"), synced("evt-b", "u-2")]))
    dbs = {prefix: project / "data" / prefix / "feature_store.duckdb" for prefix in ("alpha", "beta")}
    for prefix, db in dbs.items():
        wait_for(lambda db=db: len(query(db, "SELECT event_id FROM signal_events")) == 2, 90, f"{prefix}'s rows")
        consumers = f"feature-pipeline-{prefix}"
        wait_for(lambda c=consumers: not any(_lags(nats_server.url, c).values()), 60, f"{prefix} acked")
    with p.instance() as inst:
        jobs = {r.dagster_run.job_name for r in inst.get_run_records() if r.dagster_run.status.value == "SUCCESS"}
    assert {"alpha_ingest", "beta_ingest"} <= jobs
    assert sorted(query(dbs["alpha"], "SELECT event_id FROM signal_events")) == [("evt-a",), ("evt-b",)]

    stop = [str(BIN / "dagster"), "sensor", "stop", "alpha_ingest_sensor", "-w", str(workspace)]
    stopped = subprocess.run(stop, env=p.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    red = wait_for(
        lambda: (c := _ingest_running(p, "alpha")) and c.passed is False and c,
        2 * (10 + 5) + 15,
        "alpha's ingest_running to fail",
    )
    assert (red.description or "").startswith("alpha_ingest_sensor is STOPPED since"), red.description
    beta = _ingest_running(p, "beta")
    assert beta is not None and beta.passed, beta


def _lags(url: str, durable_prefix: str) -> dict[str, int]:
    infos = run(consumer_states(url, durable_prefix))
    return {name: i.num_pending + i.num_ack_pending for name, i in infos.items()}


def _ingest_running(p: Pipeline, prefix: str) -> dg.AssetCheckEvaluation | None:
    key = dg.AssetCheckKey(dg.AssetKey([prefix, "nats", "signals"]), "ingest_running")
    with p.instance() as inst:
        rec = inst.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
    data = rec.event.dagster_event.event_specific_data if rec and rec.event and rec.event.dagster_event else None
    return data if isinstance(data, dg.AssetCheckEvaluation) else None


def _guide_blocks() -> dict[str, str]:
    """The files of docs/component.md's "Your own sources and features", as written there, and its commands."""
    guide = (Path(__file__).parent.parent / "docs" / "component.md").read_text()
    section = guide.split("## Your own sources and features", 1)[1]
    blocks = {m: section.split(f"<<'{m}'\n", 1)[1].split(f"\n{m}\n", 1)[0] + "\n" for m in ("PY", "TOML", "YAML")}
    blocks["commands"] = section.split("```bash\nexport ", 1)[1].split("\n```", 1)[0]
    return blocks


def test_the_guide_example_of_a_teams_own_sources_loads_and_stores_them(
    tmp_path: Path,
    nats_server: LocalNats,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/component.md's shop: its models, registry and defs.yaml in a throwaway project. `dg check defs`
    refuses the registry with a models path that does not import, in words, and loads the right one; the
    guide's commands then publish the shop's events, the instance stores them and `features` reads them."""
    files = _guide_blocks()
    project = _project(tmp_path / "demo", readme=False)
    (project / "src" / "demo" / "shop_events.py").write_text(files["PY"])
    (project / "src" / "demo" / "defs" / "shop").mkdir()
    (project / "src" / "demo" / "defs" / "shop" / "defs.yaml").write_text(files["YAML"])
    registry = project / "shop_features.toml"
    registry.write_text(files["TOML"].replace("demo.shop_events:ORDERS", "demo.no_such:ORDERS"))
    monkeypatch.setenv("DEMO_NATS_URL", nats_server.url)
    monkeypatch.setenv("NATS_URL", nats_server.url)
    refused = _dg(project, "check", "defs")
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "source #1 ('orders'): models 'demo.no_such:ORDERS': cannot import demo.no_such" in said, said[-3000:]
    registry.write_text(files["TOML"])
    checked = _dg(project, "check", "defs")
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]

    defs = _load(project, monkeypatch)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"shop/nats/orders", "shop/nats/sessions", "shop/order_events", "shop/session_events"} <= keys
    assert "shop/nats/signals" not in keys
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    commands = files["commands"].splitlines()
    monkeypatch.chdir(project)
    for assignment in shlex.split(commands[0]):  # export FEATURE_PIPELINE_FEATURES_FILE=… NATS_DURABLE_PREFIX=…
        monkeypatch.setenv(*assignment.split("=", 1))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        sensor = defs.resolve_sensor_def("shop_ingest_sensor")
        with dg.build_sensor_context(
            instance=instance, resources={"shop_pipeline": defs.resources["shop_pipeline"]}
        ) as ctx:
            assert not sensor.evaluate_tick(ctx).run_requests  # the first tick makes ORDERS, SESSIONS, consumers
        for line in commands[1:3]:
            assert cli.main(shlex.split(line)[1:]) == 0, line
        assert "acked 2" in _store_one_batch(defs, "shop", instance)
    db = project / "data" / "shop" / "feature_store.duckdb"
    assert query(db, "SELECT user_id, orders_7d, spend_30d, sessions_7d FROM user_features") == [("u-42", 1, 12.5, 1)]
    capsys.readouterr()
    assert cli.main(shlex.split(commands[3])[1:]) == 0
    shown = capsys.readouterr().out
    assert "u-42" in shown and "12.5" in shown, shown
