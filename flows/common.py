"""Small helpers every flow shares: the current flow run id, events, progress bars."""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


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


def progress(description: str) -> Progress:
    """A rich progress bar on stderr (hidden when stderr is not a terminal, e.g. under a worker)."""
    return Progress(
        TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), transient=False, disable=not sys.stderr.isatty(),
    )
