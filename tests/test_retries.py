"""Retries are declared on the task and visible in Prefect: a transient catalog failure is retried and
the ingest ends Completed; a permanent one ends Failed, with the error in the run's logs.

The real `ingest_batch` task (retries=2) runs inside the real `ingest_faces` flow; only the catalog
session is made to fail, the way a locked SQLite file or a dropped PostgreSQL connection would.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

FACES = 4


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    for i in range(FACES):
        PILImage.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)).save(folder / f"face-{i}.png")
    return folder


class FailingCatalog:
    """Stands in for `session_scope`: raises for the first ``failures`` calls, then behaves normally."""

    def __init__(self, real, failures: int, message: str) -> None:
        self.real, self.failures, self.message, self.calls = real, failures, message, 0

    @contextlib.contextmanager
    def __call__(self, engine=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise OperationalError("INSERT INTO images ...", {}, Exception(self.message))
        with self.real(engine) as session:
            yield session


def inject(monkeypatch: pytest.MonkeyPatch, failures: int, message: str) -> FailingCatalog:
    import facetrace.tasks.faces as faces

    failing = FailingCatalog(faces.session_scope, failures, message)
    monkeypatch.setattr(faces, "session_scope", failing)
    return failing


def task_runs_of(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))


def images_in_catalog(url: str) -> int:
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Image

    with session_scope(get_engine(url)) as session:
        return session.scalar(select(func.count()).select_from(Image))


def test_transient_catalog_failure_is_retried_and_the_flow_completes(
        prefect_harness, sqlite_settings_env, inbox: Path, monkeypatch: pytest.MonkeyPatch):
    from prefect.client.orchestration import get_client

    from facetrace.flows.ingest import ingest_faces

    failing = inject(monkeypatch, failures=1, message="database is locked (injected, transient)")
    state = ingest_faces(kind="folder", path=str(inbox), label="real", return_state=True)

    assert state.is_completed(), state
    assert state.result()["new"] == FACES
    assert images_in_catalog(sqlite_settings_env.catalog_url) == FACES
    assert failing.calls == 2
    (batch,) = [run for run in task_runs_of(state.state_details.flow_run_id) if run.name.startswith("ingest_batch")]
    assert batch.state.is_completed() and batch.run_count == 2
    with get_client(sync_client=True) as client:
        history = [s.name for s in client.read_task_run_states(batch.id)]
    assert "AwaitingRetry" in history and history[-1] == "Completed", history


def test_permanent_catalog_failure_fails_the_flow_and_the_error_is_in_its_logs(
        prefect_harness, sqlite_settings_env, inbox: Path, monkeypatch: pytest.MonkeyPatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter
    from prefect.logging.handlers import APILogWorker

    from facetrace.flows.ingest import ingest_faces

    message = "could not connect to the catalog (injected, permanent)"
    failing = inject(monkeypatch, failures=10**6, message=message)
    state = ingest_faces(kind="folder", path=str(inbox), label="real", return_state=True)

    assert state.is_failed(), state
    assert failing.calls == 3  # the first try and the two retries declared on ingest_batch
    flow_run_id = state.state_details.flow_run_id
    (batch,) = [run for run in task_runs_of(flow_run_id) if run.name.startswith("ingest_batch")]
    assert batch.state.is_failed() and batch.run_count == 3
    with pytest.raises(OperationalError, match="injected, permanent"):
        state.result()

    # Logs reach the API in batches: flush, then poll briefly.
    APILogWorker.drain_all(timeout=10)
    deadline, errors = time.monotonic() + 20, []
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id={"any_": [flow_run_id]}))
        errors = [log for log in logs if message in log.message]
        if errors:
            break
        time.sleep(0.5)
    assert errors, f"no log of flow run {flow_run_id} mentions the failure"
    assert any(log.level >= 40 for log in errors)  # logged as an error, not buried in debug output
