"""End to end against a real Prefect server: `facetrace serve` registers the deployments, faces
dropped into the inbox are ingested by the interval schedule, the ingest event reaches the server,
the retraining trigger starts the train deployment, and the model it trains lands in the catalog.

Everything is observed the way a user would see it: through the Prefect API (flow runs, events,
automations) and the catalog. Every process the test starts is stopped, and checked to be gone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage

sys.path.insert(0, str(Path(__file__).parent))
from prefect_server import VENV_BIN, ManagedProcess, PrefectServer  # noqa: E402

FACES_PER_CLASS = 20
INGEST_DEPLOYMENT = "ingest-faces/ingest-inbox"
TRAIN_DEPLOYMENT = "retrain-on-new-faces/train"
DEPLOYMENTS = {INGEST_DEPLOYMENT, TRAIN_DEPLOYMENT, "generate-synthetic-faces/generate",
               "validate-catalog/validate-nightly", "facetrace-pipeline/pipeline"}
STARTUP_TIMEOUT_S = 120
PIPELINE_TIMEOUT_S = 240
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]


def drop_faces(inbox: Path, staging: Path, per_class: int) -> None:
    """Two visibly different classes (smooth warm 'real' faces, blocky cool 'synthetic' ones), moved
    into the inbox with one rename, so a scheduled ingest never sees half of them."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40]
    for label, folder in (("real", "Real"), ("synthetic", "AI")):
        (staging / folder).mkdir(parents=True)
        for i in range(per_class):
            if label == "real":
                base = 150 + 60 * np.sin((xx + 3 * i) / 9.0)[..., None] * np.array([1.0, 0.6, 0.4])
            else:
                checks = ((xx // 4 + yy // 4 + i) % 2) * 90
                base = 60 + checks[..., None] * np.array([0.3, 0.5, 1.0])
            pixels = np.clip(base + rng.normal(0, 8, (40, 40, 3)), 0, 255).astype("uint8")
            PILImage.fromarray(pixels, "RGB").save(staging / folder / f"{label}-{i:02d}.png")
    os.rename(staging, inbox / "drop-1")  # labels come from the Real/ and AI/ folders


def wait_for(what: str, probe: Callable[[], Any], timeout: float, alive: ManagedProcess, interval: float = 1.0):
    """Poll ``probe`` until it returns something truthy; fail early if the served process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        if not alive.running():
            pytest.fail(f"{alive.name} exited while waiting for {what}:\n{alive.log_tail()}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; {alive.name} log:\n{alive.log_tail()}")


def model_rows(catalog_url: str) -> list[tuple]:
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(catalog_url)
    try:
        if not inspect(engine).has_table("models"):
            return []
        with engine.connect() as conn:
            return conn.execute(text("SELECT id, backbone, flow_run_id FROM models")).all()
    finally:
        engine.dispose()


def test_inbox_faces_are_ingested_and_retraining_is_triggered_by_the_event(tmp_path: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    data = tmp_path / "data"
    catalog_url = f"sqlite:///{data / 'catalog.sqlite'}"
    with PrefectServer(tmp_path / "prefect") as server:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("PREFECT_", "FACETRACE_"))}
        env.update(server.client_env())
        env.update({
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "FACETRACE_DATA_DIR": str(data),
            "FACETRACE_DB_URL": catalog_url,
            "FACETRACE_INBOX_INTERVAL_S": "5",
            "FACETRACE_RETRAIN_MIN_NEW_FACES": str(2 * FACES_PER_CLASS),
            "FACETRACE_TRAIN_EPOCHS": "1",
            "FACETRACE_IMAGE_SIZE": "32",
            "FACETRACE_TRAIN_BACKBONES": json.dumps(["mobilenet_v2"]),
            "FACETRACE_WORKERS": "1",
            "OMP_NUM_THREADS": "1",
            "TF_NUM_INTRAOP_THREADS": "2",
            "TF_NUM_INTEROP_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        })
        serve = ManagedProcess("facetrace serve", [str(VENV_BIN / "facetrace"), "serve"], env,
                               tmp_path / "serve.log", cwd=Path(__file__).resolve().parents[1])
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
                def deployments() -> dict[str, Any]:
                    found = {f"{flow.name}/{d.name}": d
                             for d in client.read_deployments()
                             for flow in [client.read_flow(d.flow_id)]}
                    return found if DEPLOYMENTS <= set(found) else {}

                registered = wait_for("the five deployments", deployments, STARTUP_TIMEOUT_S, serve, 2)
                (automation,) = wait_for("the retraining automation",
                                         lambda: client.read_automations_by_name("retrain-when-faces-arrive"),
                                         30, serve)
                assert automation.enabled
                train_id = registered[TRAIN_DEPLOYMENT].id
                assert registered[TRAIN_DEPLOYMENT].global_concurrency_limit.limit == 1  # one training at a time
                ingest = registered[INGEST_DEPLOYMENT]
                assert ingest.global_concurrency_limit.limit == 1
                assert ingest.concurrency_options.collision_strategy == "CANCEL_NEW"

                inbox = data / "inbox"
                wait_for("the inbox", lambda: (inbox / "real").is_dir(), 30, serve)
                drop_faces(inbox, tmp_path / "staging", FACES_PER_CLASS)

                def finished_train_runs():
                    return client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id={"any_": [train_id]}),
                        flow_run_filter=FlowRunFilter(state={"type": {"any_": list(FINAL_STATES)}}))

                (train_run, *later) = wait_for("the triggered training run to finish", finished_train_runs,
                                               PIPELINE_TIMEOUT_S, serve, 2)
                ingest_runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id={"any_": [registered[INGEST_DEPLOYMENT].id]}),
                    flow_run_filter=FlowRunFilter(state={"type": {"any_": ["COMPLETED"]}}))
                assert ingest_runs, "no completed ingest run"

                arrived = client.read_events(EventFilter(
                    event=EventNameFilter(name=["facetrace.faces.ingested"]),
                    resource=EventResourceFilter(labels={"facetrace.faces.arrived": "true"})), limit=50).events
                assert sum(e.payload["new"] for e in arrived) == 2 * FACES_PER_CLASS, [e.payload for e in arrived]
                assert all(e.payload["quarantined"] == 0 for e in arrived)
                completed_ingests = {str(run.id) for run in ingest_runs}
                for event in arrived:
                    related_runs = {r.id.removeprefix("prefect.flow-run.") for r in event.related
                                    if r.role == "flow-run"}
                    assert related_runs & completed_ingests, f"event {event.id} names no completed ingest run"

                assert not later, "one drop of faces, one ingest event with new faces: one training run"
                # Each catalogued file left the inbox for processed/ (same relative path): scans read only new files.
                assert not [p for p in inbox.rglob("*") if p.is_file()]
                assert len(list((data / "processed" / "drop-1").rglob("*.png"))) == 2 * FACES_PER_CLASS
                assert train_run.state.is_completed(), f"{train_run.state}\n{serve.log_tail()}"
                assert train_run.created_by is not None and train_run.created_by.type == "AUTOMATION", \
                    train_run.created_by
                assert train_run.created_by.id == automation.id
                assert train_run.parameters["min_new_faces"] == 2 * FACES_PER_CLASS

                # The model row names the flow run that trained it (where the catalog meets the UI): the
                # train-and-evaluate subflow of the triggered run.
                ((_, backbone, model_run_id),) = model_rows(catalog_url)
                assert backbone == "mobilenet_v2"
                model_run = client.read_flow_run(model_run_id)
                assert model_run.state.is_completed()
                assert client.read_task_run(model_run.parent_task_run_id).flow_run_id == train_run.id
        finally:
            exit_status = serve.stop()
        assert not serve.running()
        assert exit_status is not None
    assert server.process is not None and not server.process.running()


def test_prefect_yaml_registers_the_same_deployments_on_work_pools(tmp_path: Path):
    """`prefect deploy --all` (deployments/prefect.yaml): the five deployments, on the cpu and gpu pools,
    with the inbox schedule, one training at a time, and the retraining automation."""
    import subprocess

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo = Path(__file__).resolve().parents[1]
    with PrefectServer(tmp_path / "prefect") as server:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update(server.client_env())

        def prefect(*argv: str) -> str:
            done = subprocess.run([str(VENV_BIN / "prefect"), *argv], env=env, cwd=repo, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, f"prefect {' '.join(argv)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            return done.stdout

        for pool in ("cpu", "gpu"):
            prefect("work-pool", "create", pool, "--type", "process")
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")

        with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
            found = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
            assert set(found) == DEPLOYMENTS
            pools = {name: d.work_pool_name for name, d in found.items()}
            assert pools["generate-synthetic-faces/generate"] == "gpu"
            assert {pools[name] for name in DEPLOYMENTS - {"generate-synthetic-faces/generate"}} == {"cpu"}
            ingest, train = found[INGEST_DEPLOYMENT], found[TRAIN_DEPLOYMENT]
            assert [s.schedule.interval.total_seconds() for s in ingest.schedules] == [300]
            assert ingest.concurrency_options.collision_strategy == "CANCEL_NEW"
            assert train.global_concurrency_limit.limit == 1
            (automation,) = client.read_automations_by_name("retrain-when-faces-arrive")
            assert automation.trigger.expect == {"facetrace.faces.ingested"}
            assert automation.trigger.match.root["facetrace.faces.arrived"] == "true"
            assert automation.actions[0].deployment_id == train.id
    assert not server.process.running()
