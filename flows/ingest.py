"""Ingest real (or imported synthetic) faces into the catalog: list a source, then store and
catalogue its files in batches spread over the workers, then report and emit an event."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from facetrace.db.catalog import BatchCounts, ensure_source
from facetrace.db.engine import get_engine, session_scope
from facetrace.flows.common import current_flow_run_id, emit, progress
from facetrace.settings import get_settings
from facetrace.tasks.faces import (
    KAGGLE_DEFAULT,
    Listing,
    download_kaggle,
    ingest_batch,
    list_folder,
    list_sample,
    list_zip,
)
from facetrace.tasks.storage import REASONS, Limits

INGESTED_EVENT = "facetrace.faces.ingested"


def list_source(kind: str, path: str | None, label: str | None, provenance: str | None, slug: str | None) -> Listing:
    settings = get_settings()
    csv_path = Path(provenance) if provenance else None
    if kind == "folder":
        return list_folder(Path(path), label, csv_path)
    if kind == "zip":
        return list_zip(Path(path), label, provenance_csv=csv_path)
    if kind == "kaggle":
        slug = slug or KAGGLE_DEFAULT
        archive = download_kaggle(slug, settings.data_dir / "cache")
        return list_zip(archive, label, kind="kaggle", reference=slug, provenance_csv=csv_path)
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


@flow(name="ingest-faces", task_runner=ThreadPoolTaskRunner(max_workers=get_settings().workers), log_prints=True)
def ingest_faces(
    kind: str = "sample",
    path: str | None = None,
    label: str | None = None,
    provenance: str | None = None,
    slug: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """Ingest one source (folder, zip, kaggle or sample) into the catalog; idempotent."""
    logger = get_run_logger()
    settings = get_settings()
    run_id = current_flow_run_id()
    engine = get_engine(settings.catalog_url)
    listing = list_source(kind, path, label, provenance, slug)
    with session_scope(engine) as session:
        source_id = ensure_source(session, listing.source.kind, listing.source.reference,
                                  license=listing.source.license, version=listing.source.version,
                                  details=listing.source.details, flow_run_id=run_id)

    size = batch_size or settings.batch_size
    batches = [listing.candidates[i:i + size] for i in range(0, len(listing.candidates), size)]
    limits = Limits.from_settings()
    futures = [ingest_batch.submit(batch, source_id, settings.data_dir, settings.catalog_url, limits, run_id)
               for batch in batches]
    counts = BatchCounts()
    with progress(f"ingest {listing.source.kind}") as bar:
        job = bar.add_task("files", total=len(listing.candidates))
        for future in as_completed(futures):
            result = future.result()
            counts.add(result)
            bar.advance(job, result.seen)

    summary = counts.as_dict()
    assert summary["seen"] == summary["new"] + summary["duplicate"] + summary["quarantined"]
    logger.info("ingested %s %s: %s", listing.source.kind, listing.source.reference, summary)
    create_markdown_artifact(summary_markdown(listing, counts), key="ingest-summary",
                             description=f"ingest of {listing.source.kind}")
    emit(INGESTED_EVENT, f"facetrace.source.{listing.source.kind}.{source_id}",
         {**summary, "source": listing.source.reference, "kind": listing.source.kind},
         **{"facetrace.source.kind": listing.source.kind})
    return {**summary, "source_id": source_id, "source": listing.source.reference}
