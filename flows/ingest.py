"""Ingest real (or imported synthetic) faces into the catalog: list a source, then store and
catalogue its files in batches spread over the workers, then report and emit an event."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed

from facetrace.db.catalog import BatchCounts, ensure_source
from facetrace.db.engine import get_engine, session_scope
from facetrace.flows.common import current_flow_run_id, emit, progress, task_runner
from facetrace.settings import get_settings
from facetrace.tasks.faces import (
    KAGGLE_DEFAULT,
    Listing,
    download_kaggle,
    ingest_batch,
    kaggle_source_details,
    list_folder,
    list_sample,
    list_zip,
)
from facetrace.tasks.inbox import move_ingested_files
from facetrace.tasks.sources import check_source
from facetrace.tasks.storage import REASONS, Limits, sweep_stale_temporaries
from facetrace.tasks.store import ArtifactStore

INGESTED_EVENT = "facetrace.faces.ingested"


def list_source(kind: str, path: str | None, label: str | None, provenance: str | None, slug: str | None) -> Listing:
    settings = get_settings()
    csv_path = Path(provenance) if provenance else None
    if kind in ("folder", "zip"):
        check_source(kind, path)
    if kind == "folder":
        return list_folder(Path(path), label, csv_path)
    if kind == "zip":
        return list_zip(Path(path), label, provenance_csv=csv_path)
    if kind == "kaggle":
        slug = slug or KAGGLE_DEFAULT
        archive = download_kaggle(slug, settings.data_dir / "cache")
        licence, details = kaggle_source_details(slug, archive)
        return list_zip(archive, label, kind="kaggle", reference=slug, provenance_csv=csv_path,
                        license=licence, details=details)
    if kind == "sample":
        return list_sample()
    raise ValueError(f"unknown source kind {kind!r}; expected folder, zip, kaggle or sample")


def summary_markdown(listing: Listing, counts: BatchCounts) -> str:
    lines = [
        f"# Ingest of {listing.source.kind} `{listing.source.reference}`",
        "",
        "| outcome | files |", "|---|---:|",
        f"| seen | {counts.seen} |", f"| new | {counts.new} |", f"| duplicate | {counts.duplicate} |",
        f"| quarantined | {counts.quarantined} |",
    ]
    if counts.rejected:
        lines += ["", "| quarantine reason | files | meaning |", "|---|---:|---|"]
        lines += [f"| {reason} | {n} | {REASONS[reason]} |" for reason, n in counts.rejected.most_common()]
    return "\n".join(lines)


# The fan-out runs on threads here, or on a Dask cluster with FACETRACE_TASK_RUNNER=dask (flows/common.py).
@flow(name="ingest-faces", task_runner=task_runner(), log_prints=True)
def ingest_faces(
    kind: str = "sample",
    path: str | None = None,
    label: str | None = None,
    provenance: str | None = None,
    slug: str | None = None,
    batch_size: int | None = None,
    archive_dir: str | None = None,
) -> dict:
    """Ingest one source (folder, zip, kaggle or sample) into the catalog; idempotent.

    ``archive_dir`` (folders only; the inbox deployment sets it): once the batches have committed,
    move each catalogued file to ``archive_dir/processed/`` and each quarantined one to
    ``archive_dir/rejected/``, keeping relative paths, so the next scan reads only new files.
    """
    logger = get_run_logger()
    settings = get_settings()
    run_id = current_flow_run_id()
    engine = get_engine(settings.catalog_url)
    store = ArtifactStore.from_settings(settings)
    if store.local and (swept := sweep_stale_temporaries(settings.data_dir)):
        logger.info("removed %d temporary files left by an interrupted ingest", swept)
    listing = list_source(kind, path, label, provenance, slug)
    with session_scope(engine) as session:
        source_id = ensure_source(session, listing.source.kind, listing.source.reference,
                                  license=listing.source.license, version=listing.source.version,
                                  details=listing.source.details, flow_run_id=run_id)

    size = batch_size or settings.batch_size
    batches = [listing.candidates[i:i + size] for i in range(0, len(listing.candidates), size)]
    limits = Limits.from_settings()
    futures = [ingest_batch.submit(batch, source_id, store, settings.catalog_url, limits, run_id)
               for batch in batches]
    counts = BatchCounts()
    total, next_report = len(listing.candidates), 0.1
    with progress(f"ingest {listing.source.kind}") as bar:
        job = bar.add_task("files", total=total)
        for future in as_completed(futures):
            result = future.result()
            counts.add(result)
            bar.advance(job, result.seen)
            if bar.disable and total and counts.seen / total >= next_report:  # no terminal: log instead
                logger.info("progress: %d of %d files (%d new)", counts.seen, total, counts.new)
                next_report = counts.seen / total + 0.1

    summary = counts.as_dict()
    if summary["seen"] != total or summary["seen"] != summary["new"] + summary["duplicate"] + summary["quarantined"]:
        raise RuntimeError(f"ingest totals do not reconcile: {total} listed, {summary}")
    if archive_dir and kind == "folder":  # after every batch committed: nothing moves before it is recorded
        summary["moved"] = move_ingested_files(Path(listing.source.reference), [c.name for c in listing.candidates],
                                               counts.rejected_names, Path(archive_dir))
    logger.info("ingested %s %s: %s", listing.source.kind, listing.source.reference, summary)
    create_markdown_artifact(summary_markdown(listing, counts), key="ingest-summary",
                             description=f"ingest of {listing.source.kind}")
    emit(INGESTED_EVENT, f"facetrace.source.{listing.source.kind}.{source_id}",
         {**summary, "source": listing.source.reference, "kind": listing.source.kind},
         **{"facetrace.source.kind": listing.source.kind,
            # A label (not only the payload) so that triggers can react to new faces alone.
            "facetrace.faces.arrived": "true" if summary["new"] else "false"})
    return {**summary, "source_id": source_id, "source": listing.source.reference}
