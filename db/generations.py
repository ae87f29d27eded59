"""Catalog reads and writes for generated images: which items of a request exist, the generation
row that makes an image reproducible, and the rows needed to regenerate it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from facetrace.db.catalog import _insert
from facetrace.db.models import Generation, Image, Prompt

# The generation columns a provenance dict must fill (besides image, prompt, request and index).
GENERATION_FIELDS = (
    "model_id", "model_revision", "model_hash", "pipeline_class", "scheduler_class", "scheduler_config",
    "steps", "guidance", "seed", "width", "height", "dtype", "device", "safety_checker",
    "library_versions", "duration_s", "flow_run_id", "execution",
)


def generated_item_indices(session: Session, request_key: str, indices: Iterable[int] | None = None) -> set[int]:
    """The item indices of ``request_key`` already in the catalog (optionally among ``indices``)."""
    stmt = select(Generation.item_index).where(Generation.request_key == request_key)
    if indices is not None:
        stmt = stmt.where(Generation.item_index.in_(list(indices)))
    return set(session.scalars(stmt))


def add_generation(
    session: Session, image_id: int, prompt_id: int, request_key: str, item_index: int, provenance: dict[str, Any]
) -> bool:
    """Record how image ``image_id`` was made; False when the item (or the image) already has its row."""
    values = {name: provenance.get(name) for name in GENERATION_FIELDS}
    stmt = (
        _insert(session, Generation)
        .values(image_id=image_id, prompt_id=prompt_id, request_key=request_key, item_index=item_index, **values)
        .on_conflict_do_nothing()
        .returning(Generation.id)
    )
    return session.scalar(stmt) is not None


def image_paths(session: Session, sha256s: Iterable[str]) -> dict[str, str]:
    """Stored path (relative to the data root) of each catalogued image among ``sha256s``."""
    rows = session.execute(select(Image.sha256, Image.path).where(Image.sha256.in_(list(sha256s))))
    return {sha: path for sha, path in rows}


@dataclass(frozen=True)
class GenerationRecord:
    """An image with the rows that made it: enough to run the pipeline again."""

    image: Image
    generation: Generation
    prompt: Prompt
    batch_prompts: dict[int, Prompt]  # prompt id -> prompt, for every member of the image's batch


def generation_for_sha(session: Session, sha256: str) -> GenerationRecord | None:
    """The generation behind image ``sha256``, or None when the image was not generated here."""
    row = session.execute(
        select(Image, Generation, Prompt)
        .join(Generation, Generation.image_id == Image.id)
        .join(Prompt, Prompt.id == Generation.prompt_id)
        .where(Image.sha256 == sha256.lower())
    ).first()
    if row is None:
        return None
    image, generation, prompt = row
    ids = set((generation.execution or {}).get("batch_prompt_ids") or []) | {prompt.id}
    prompts = {p.id: p for p in session.scalars(select(Prompt).where(Prompt.id.in_(ids)))}
    return GenerationRecord(image, generation, prompt, prompts)
