"""The end-to-end pipeline: ingest -> prompts -> generate -> validate -> train, evaluate, register.

Every step is a subflow, so each shows up in the Prefect UI on its own and can also run alone
(from the CLI, a schedule or an event). Defaults are the offline embedded setup: scikit-image's
sample faces, template prompts, the tiny diffusion pipeline, small images, few epochs.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from sqlalchemy import func, select

from facetrace.db.engine import get_engine, session_scope
from facetrace.db.models import Image, Snapshot, SnapshotImage
from facetrace.settings import get_settings

DEMO_BACKBONES = ("mobilenet_v2", "xception")


@flow(name="facetrace-pipeline", log_prints=True)
def facetrace_pipeline(
    faces: str | None = None,
    faces_label: str | None = None,
    synthetic_count: int | None = None,
    prompt_style: str = "simple",
    llm: str = "template",
    diffusion_model: str = "tiny",
    diffusion_steps: int = 4,
    generate_batch_size: int = 16,  # fewer, larger batches: less per-task overhead on CPU
    image_px: int = 64,
    backbones: list[str] = list(DEMO_BACKBONES),
    epochs: int = 3,
    train_image_size: int = 72,  # Xception needs at least 71 px
    seed: int = 0,
) -> dict:
    """Run the whole chain. ``faces`` is a folder of real faces (default: the bundled LFW sample).

    ``synthetic_count`` defaults to the number of real images, so the classes are balanced.
    """
    from facetrace.flows.generate import generate_synthetic_faces
    from facetrace.flows.ingest import ingest_faces
    from facetrace.flows.prompts import write_prompts
    from facetrace.flows.train import train_and_evaluate
    from facetrace.flows.validate import validate_catalog

    logger = get_run_logger()
    if faces:
        kind = "zip" if faces.lower().endswith(".zip") else "folder"
        ingested = ingest_faces(kind=kind, path=faces, label=faces_label)
    else:
        ingested = ingest_faces(kind="sample")
    real = count_images("real")
    target = synthetic_count if synthetic_count is not None else real
    logger.info("catalog holds %d real faces; generating up to %d synthetic", real, target)
    # Template prompts are reused row for row, so a re-run writes no new prompts and generates nothing new.
    prompt_ids = write_prompts(count=max(target, 1), style=prompt_style, llm=llm, seed=seed)
    generated = generate_synthetic_faces(
        n=target, model=diffusion_model, steps=diffusion_steps, size=image_px, prompt_style=prompt_style,
        batch_size=generate_batch_size, seed=seed, llm=llm, prompt_ids=prompt_ids,
    )
    validation = validate_catalog()
    trained = train_and_evaluate(backbones=tuple(backbones), epochs=epochs, image_size=train_image_size, seed=seed)
    return {"ingested": ingested, "prompts": len(prompt_ids), "generated": generated,
            "validation": validation, "training": trained}


def count_images(label: str) -> int:
    with session_scope(get_engine(get_settings().catalog_url)) as session:
        return session.scalar(select(func.count()).where(Image.label == label, Image.status == "ok")) or 0


def images_since_last_snapshot() -> int:
    """Usable images that the latest snapshot does not contain (all of them when none exists)."""
    with session_scope(get_engine(get_settings().catalog_url)) as session:
        latest = session.scalar(select(func.max(Snapshot.id)))
        query = select(func.count()).select_from(Image).where(Image.status == "ok")
        if latest is not None:
            in_snapshot = select(SnapshotImage.image_id).where(SnapshotImage.snapshot_id == latest)
            query = query.where(Image.id.not_in(in_snapshot))
        return session.scalar(query) or 0


@flow(name="retrain-on-new-faces", log_prints=True)
def retrain_on_new_faces(
    min_new_faces: int = 50,
    backbones: list[str] = list(DEMO_BACKBONES),
    epochs: int = 3,
    image_size: int = 64,
    seed: int = 0,
) -> dict:
    """Started by `facetrace.faces.ingested` events: retrain once enough new faces have arrived.

    Several small ingests add up: the count is taken from the catalog (images the latest snapshot
    lacks), not from one event's payload.
    """
    from facetrace.flows.train import train_and_evaluate

    logger = get_run_logger()
    new = images_since_last_snapshot()
    if new < min_new_faces:
        logger.info("%d new faces since the last snapshot, fewer than %d: not retraining", new, min_new_faces)
        return {"retrained": False, "new_faces": new}
    # Real faces often arrive before any synthetic ones (a first ingest, the pipeline's first step):
    # that is a reason to wait for the next ingest, not a failed run.
    missing = [label for label in ("real", "synthetic") if count_images(label) == 0]
    if missing:
        logger.info("%d new faces, but the catalog has no usable %s images yet: not retraining",
                    new, " or ".join(missing))
        return {"retrained": False, "new_faces": new, "missing_labels": missing}
    logger.info("%d new faces since the last snapshot: retraining", new)
    result = train_and_evaluate(backbones=tuple(backbones), epochs=epochs, image_size=image_size, seed=seed)
    return {"retrained": True, "new_faces": new, "training": result}
