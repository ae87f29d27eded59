"""Catalog writes and reads that more than one flow needs. Idempotent by construction:
inserts use ON CONFLICT DO NOTHING on the database's unique keys, so re-runs and concurrent
runs neither duplicate rows nor fail on "already exists"."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from facetrace.db.models import Image, Prompt, Rejection, Sighting, Source


def _insert(session: Session, model: type):
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)


def ensure_source(
    session: Session,
    kind: str,
    reference: str,
    *,
    license: str | None = None,
    version: str | None = None,
    details: dict[str, Any] | None = None,
    flow_run_id: str | None = None,
) -> int:
    """The id of the source (kind, reference), created on first sight; never rewritten."""
    stmt = (
        _insert(session, Source)
        .values(kind=kind, reference=reference, license=license, version=version, details=details,
                flow_run_id=flow_run_id)
        .on_conflict_do_nothing(index_elements=["kind", "reference"])
    )
    session.execute(stmt)
    return session.scalar(select(Source.id).where(Source.kind == kind, Source.reference == reference))


@dataclass
class AcceptedImage:
    """An image already stored on disk, ready for its catalog row."""

    original_name: str
    label: str
    path: str
    record: Any  # tasks.storage.ImageRecord (db must not import tasks)
    prompt_id: int | None = None
    provenance: str | None = None


@dataclass
class BatchCounts:
    seen: int = 0
    new: int = 0
    duplicate: int = 0
    rejected: Counter = field(default_factory=Counter)
    new_image_ids: list[int] = field(default_factory=list)

    def add(self, other: BatchCounts) -> None:
        self.seen += other.seen
        self.new += other.new
        self.duplicate += other.duplicate
        self.rejected.update(other.rejected)
        self.new_image_ids.extend(other.new_image_ids)

    @property
    def quarantined(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "new": self.new, "duplicate": self.duplicate,
                "quarantined": self.quarantined, "quarantined_by_reason": dict(self.rejected)}


def add_image(
    session: Session, source_id: int, image: AcceptedImage, flow_run_id: str | None = None
) -> tuple[int, bool]:
    """Catalogue one stored image; returns (image id, whether it is new). Records the sighting either way."""
    rec = image.record
    stmt = (
        _insert(session, Image)
        .values(
            sha256=rec.sha256, path=image.path, label=image.label, source_id=source_id,
            original_name=image.original_name, format=rec.format, mode=rec.mode, width=rec.width,
            height=rec.height, bytes=rec.bytes, phash=rec.phash, exif_orientation=rec.exif_orientation,
            frames=rec.frames, dedup_group=rec.sha256, prompt_id=image.prompt_id,
            provenance=image.provenance, status="ok", flow_run_id=flow_run_id,
        )
        .on_conflict_do_nothing(index_elements=["sha256"])
        .returning(Image.id)
    )
    image_id = session.scalar(stmt)
    is_new = image_id is not None
    if not is_new:
        image_id = session.scalar(select(Image.id).where(Image.sha256 == rec.sha256))
    session.execute(
        _insert(session, Sighting)
        .values(source_id=source_id, original_name=image.original_name, image_id=image_id, flow_run_id=flow_run_id)
        .on_conflict_do_nothing(index_elements=["source_id", "original_name"])
    )
    return image_id, is_new


def add_rejection(
    session: Session, source_id: int, original_name: str, reason: str, detail: str,
    *, sha256: str | None = None, size: int | None = None, flow_run_id: str | None = None,
) -> None:
    session.execute(
        _insert(session, Rejection)
        .values(source_id=source_id, original_name=original_name, reason=reason, detail=detail[:2000],
                sha256=sha256, bytes=size, flow_run_id=flow_run_id)
        .on_conflict_do_nothing(index_elements=["source_id", "original_name"])
    )


def import_prompt(session: Session, text: str, flow_run_id: str | None = None) -> int:
    """The id of an imported prompt (from a provenance CSV), reusing an identical one."""
    existing = session.scalar(select(Prompt.id).where(Prompt.method == "import", Prompt.text == text).limit(1))
    if existing is not None:
        return existing
    prompt = Prompt(text=text, method="import", flow_run_id=flow_run_id)
    session.add(prompt)
    session.flush()
    return prompt.id


def status_counts(session: Session) -> dict[str, list[tuple]]:
    """Counts by label, by source and by status, for `facetrace status`."""
    by_label = session.execute(
        select(Image.label, Image.status, func.count()).group_by(Image.label, Image.status).order_by(Image.label)
    ).all()
    by_source = session.execute(
        select(Source.kind, Source.reference, Image.label, func.count())
        .join(Image, Image.source_id == Source.id)
        .group_by(Source.kind, Source.reference, Image.label)
        .order_by(Source.kind, Source.reference)
    ).all()
    rejected = session.execute(
        select(Rejection.reason, func.count()).group_by(Rejection.reason).order_by(func.count().desc())
    ).all()
    return {"by_label": by_label, "by_source": by_source, "rejected": rejected}
