"""Small helpers every flow shares: the current flow run id, events, the task runner, progress bars."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

    from facetrace.settings import Settings


def current_flow_run_id() -> str | None:
    """The Prefect flow run id, or None outside a flow (a plain `.fn` call)."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


def emit(event: str, resource_id: str, payload: dict[str, Any], **labels: str) -> None:
    """Emit a Prefect event that deployments' triggers and automations can react to."""
    from prefect.events import emit_event

    resource = {"prefect.resource.id": resource_id, **labels}
    run_id = current_flow_run_id()
    related = [{"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "flow-run"}] if run_id else None
    emit_event(event=event, resource=resource, payload=payload, related=related)


def task_runner(settings: Settings | None = None) -> TaskRunner:
    """The task runner for a flow's fan-out, from settings: threads in this process (default), or Dask.

    ``FACETRACE_TASK_RUNNER=dask`` spreads tasks over a Dask cluster: the one at
    ``FACETRACE_DASK_ADDRESS``, or else a local cluster of ``FACETRACE_DASK_WORKERS`` processes
    started for the flow run and closed after it. Same code, same results; only where it runs changes.
    """
    from facetrace.settings import get_settings

    settings = settings or get_settings()
    if settings.task_runner == "dask":
        from prefect_dask import DaskTaskRunner  # imports dask.distributed: only when asked for

        if settings.dask_address:
            return DaskTaskRunner(address=settings.dask_address)
        # One thread per worker process: the work is CPU-bound Python (decode, hash, store).
        return DaskTaskRunner(cluster_kwargs={"n_workers": settings.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=settings.workers)


@contextlib.contextmanager
def foreground_runs() -> Iterator[None]:
    """Flow runs started in this block, by a process that runs and watches them itself (the command
    line, a benchmark), run without Prefect's heartbeat thread, unless the user configured heartbeats.

    Heartbeats let a server mark a run crashed when its worker vanished; a foreground run's failure
    reaches its terminal instead. Prefect 3.9 starts one per flow run (every 180 s by default) and,
    when the run ends, joins it while it sleeps in one-second steps: each flow and subflow run paid up
    to a second at exit for nothing (an unchanged ingest: 2.66 s -> 2.12 s, docs/cli.md).
    Deployment runs (workers, ``facetrace serve``) keep Prefect's default.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:  # set in the env or a profile
        yield
        return
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def progress(description: str) -> Progress:
    """A rich progress bar on stderr (hidden when stderr is not a terminal, e.g. under a worker)."""
    return Progress(
        TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), transient=False, disable=not sys.stderr.isatty(),
    )
