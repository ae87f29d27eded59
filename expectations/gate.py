"""The validation gate: record each suite's outcome in ``validation_runs`` and answer "may we train?".

Light on purpose (no Great Expectations import): the training flow imports it to refuse a catalog
whose latest validation failed critically.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from facetrace.db.models import ValidationRun


class CriticalValidationFailure(RuntimeError):
    """A validation run failed a critical expectation (raised by the validate flow after recording
    the run); ``summary`` holds the whole run's outcome, as the flow would have returned it."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


class CatalogInvalid(RuntimeError):
    """The catalog's latest validation failed a critical expectation; fix it and run `facetrace validate`."""


def record_validation_run(
    session: Session, suite: str, *, success: bool, critical_failure: bool, statistics: dict[str, Any],
    results: list[dict[str, Any]], data_docs: str | None, flow_run_id: str | None,
) -> int:
    run = ValidationRun(suite=suite, success=success, critical_failure=critical_failure, statistics=statistics,
                        results=results, data_docs=data_docs, flow_run_id=flow_run_id)
    session.add(run)
    session.flush()
    return run.id


def latest_runs(session: Session) -> list[ValidationRun]:
    """The most recent run of each suite (a later run of one suite does not hide another's failure)."""
    latest = select(ValidationRun.suite, func.max(ValidationRun.id).label("id")).group_by(ValidationRun.suite).subquery()
    return list(session.scalars(
        select(ValidationRun).join(latest, ValidationRun.id == latest.c.id).order_by(ValidationRun.suite)))


def latest_validation_failed_critically(session: Session) -> bool:
    """True when the latest run of any suite failed a critical expectation. A catalog never
    validated has not failed (training on it is allowed; `facetrace validate` is advised)."""
    return any(run.critical_failure for run in latest_runs(session))


def ensure_catalog_valid(session: Session) -> None:
    """Raise :class:`CatalogInvalid`, naming the failed suites and rules, if the catalog must not be used."""
    failed = [run for run in latest_runs(session) if run.critical_failure]
    if not failed:
        return
    rules = []
    for run in failed:
        broken = [r.get("description", r.get("expectation")) for r in (run.results or [])
                  if not r.get("success") and r.get("severity") == "critical"]
        rules.append(f"{run.suite} (run {run.id}: {'; '.join(broken[:3]) or 'critical failure'})")
    raise CatalogInvalid(
        "the catalog's latest validation failed critically: " + ", ".join(rules)
        + ". Fix the catalog and run `facetrace validate` again."
    )
