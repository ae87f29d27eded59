"""Validate the catalog and its files with the Great Expectations suites in ``expectations/``:
build the frames, run the suites, build the data docs, record one ``validation_runs`` row per
suite, publish a summary artifact, and fail the flow run on a critical failure (after recording it,
so the training flow's gate sees it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from facetrace.db.engine import get_engine, make_engine, session_scope
from facetrace.expectations.frames import check_files, load_catalog_frames, split_leakage
from facetrace.expectations.gate import CriticalValidationFailure, record_validation_run
from facetrace.expectations.suites import SUITES, Thresholds
from facetrace.flows.common import current_flow_run_id, emit
from facetrace.settings import get_settings
from facetrace.tasks.store import ArtifactStore

VALIDATED_EVENT = "facetrace.catalog.validated"


def docs_root(data_dir: Path) -> Path:
    """Where the GX project (suites, results, data docs) lives under the data root."""
    return Path(data_dir).resolve() / "validation"


@task(cache_policy=NO_CACHE)
def load_frames(catalog_url: str, near_duplicate_distance: int, prediction_window_days: int = 7) -> dict[str, Any]:
    """The catalog's frames, read in one read-only transaction; the splits frame when a snapshot
    exists, the predictions frame when the API answered in the window."""
    get_engine(catalog_url)  # migrated before a read-only connection opens it
    engine = make_engine(catalog_url, read_only=True)
    try:
        loaded = load_catalog_frames(engine, prediction_window_days)
    finally:
        engine.dispose()
    frames: dict[str, Any] = {"images": loaded["images"], "intake": loaded["intake"],
                              "snapshot_id": loaded["snapshot_id"]}
    if loaded["members"] is not None:
        frames["splits"] = split_leakage(loaded["members"], near_duplicate_distance)
    if len(loaded["predictions"]):
        frames["predictions"] = loaded["predictions"]
    return frames


@task(cache_policy=NO_CACHE)
def check_catalog_files(images: pd.DataFrame, store: ArtifactStore, sample: int, workers: int) -> pd.DataFrame:
    """Read, hash and decode every catalogued object of the store (or a random sample of ``sample``)."""
    return check_files(images, store, sample=sample, workers=workers)


@task(cache_policy=NO_CACHE)
def publish_data_docs(store: ArtifactStore, data_dir: Path, index: Path, outcomes: list) -> str:
    """The data docs site built on this machine -> the store under ``validation/gx/...`` (on a local
    store it is already there); each outcome's page becomes a store key. Returns the index page's key."""
    site = Path(index).resolve().parent
    prefix = site.relative_to(docs_root(data_dir).parent).as_posix()  # validation/gx/uncommitted/...
    if not store.local:
        store.put_tree(prefix, site)
    for outcome in outcomes:
        if outcome.docs_page:
            outcome.docs_page = f"{prefix}/{Path(outcome.docs_page).resolve().relative_to(site).as_posix()}"
    return f"{prefix}/{Path(index).name}"


@task(cache_policy=NO_CACHE)
def run_suites(frames: dict[str, pd.DataFrame], thresholds: Thresholds, project_root: Path | None,
               run_name: str | None):
    """Run the suites and build the data docs, in one GX context."""
    from facetrace.expectations.runner import open_context, validate_frames

    return validate_frames(open_context(project_root), frames, thresholds, run_name=run_name)


@task(cache_policy=NO_CACHE)
def record_outcomes(catalog_url: str, outcomes: list, flow_run_id: str | None) -> list[int]:
    with session_scope(get_engine(catalog_url)) as session:
        return [
            record_validation_run(
                session, o.suite, success=o.success, critical_failure=o.critical_failure,
                statistics=o.statistics, results=[e.as_dict() for e in o.expectations],
                data_docs=o.docs_page, flow_run_id=flow_run_id,
            )
            for o in outcomes
        ]


def summary_rows(outcomes: list) -> list[dict[str, Any]]:
    """One row per expectation, failures first, for the artifact and the CLI."""
    rows = [
        {"suite": o.suite, "severity": e.severity, "expectation": e.description, "observed": e.observed,
         "result": "pass" if e.success else "FAIL", "data docs": o.docs_page or ""}
        for o in outcomes for e in o.expectations
    ]
    return sorted(rows, key=lambda r: (r["result"] == "pass", r["severity"] != "critical", r["suite"]))


@flow(name="validate-catalog", log_prints=True)
def validate_catalog(suites: list[str] | None = None, file_sample: int | None = None,
                     data_docs: bool = True) -> dict[str, Any]:
    """Validate the catalog (and a sample of its files); fail on a critical failure.

    ``suites`` defaults to all (catalog, intake, files, splits once a snapshot exists, and
    predictions once `facetrace api` has answered in the window);
    ``file_sample`` overrides FACETRACE_VALIDATION_FILE_SAMPLE (0 = every file).
    """
    logger = get_run_logger()
    settings = get_settings()
    store = ArtifactStore.from_settings(settings)
    run_id = current_flow_run_id()
    thresholds = Thresholds.from_settings(file_sample=file_sample)
    wanted = list(suites or SUITES)
    unknown = set(wanted) - set(SUITES)
    if unknown:
        raise ValueError(f"unknown suite(s) {sorted(unknown)}; expected some of {list(SUITES)}")

    loaded = load_frames(settings.catalog_url, thresholds.near_duplicate_distance, thresholds.prediction_window_days)
    frames: dict[str, pd.DataFrame] = {}
    if "catalog" in wanted:
        frames["catalog"] = loaded["images"]
    if "intake" in wanted:
        frames["intake"] = loaded["intake"]
    if "splits" in wanted and "splits" in loaded:
        frames["splits"] = loaded["splits"]
    if "predictions" in wanted and "predictions" in loaded:
        frames["predictions"] = loaded["predictions"]
    if "files" in wanted:
        frames["files"] = check_catalog_files(loaded["images"], store, thresholds.file_sample, settings.workers)

    # The GX project (suites, results, the site) is built on this machine; the site is then published.
    root = docs_root(settings.data_dir) if data_docs else None
    outcomes, index = run_suites(frames, thresholds, root, run_id)
    if root is not None and index:
        index = store.url_for(publish_data_docs(store, settings.data_dir, index, outcomes))
    else:  # an ephemeral context's pages are in a temporary folder of this machine: nothing to record
        index = None
        for outcome in outcomes:
            outcome.docs_page = None
    for outcome in outcomes:
        if outcome.suite == "files":
            outcome.statistics.update(frames["files"].attrs)
        if outcome.suite == "splits":
            outcome.statistics["snapshot_id"] = loaded["snapshot_id"]
    record_outcomes(settings.catalog_url, outcomes, run_id)

    rows = summary_rows(outcomes)
    critical = [o.suite for o in outcomes if o.critical_failure]
    summary = {
        "success": all(o.success for o in outcomes),
        "critical_failure": bool(critical),
        "suites": {o.suite: {"success": o.success, "critical_failure": o.critical_failure,
                             "statistics": o.statistics, "data_docs": o.docs_page} for o in outcomes},
        "data_docs": index,  # where a person opens it: a local path, or the store URL
        "rows": rows,
    }
    create_table_artifact(rows, key="catalog-validation",
                          description=f"catalog validation; data docs: {summary['data_docs'] or 'not built'}")
    emit(VALIDATED_EVENT, "facetrace.catalog", {k: summary[k] for k in ("success", "critical_failure", "data_docs")})
    failed = [r for r in rows if r["result"] == "FAIL"]
    logger.info("validation: %d expectations, %d failed (%s critical); data docs %s",
                len(rows), len(failed), sum(r["severity"] == "critical" for r in failed), summary["data_docs"])
    if critical:
        raise CriticalValidationFailure(
            f"critical expectations failed in suite(s) {', '.join(critical)}: "
            + "; ".join(r["expectation"] for r in failed if r["severity"] == "critical")[:500],
            summary,
        )
    return summary
