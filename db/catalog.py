"""Catalog writes and reads that more than one flow needs. Idempotent by construction:
inserts use ON CONFLICT DO NOTHING on the database's unique keys, so re-runs and concurrent
runs neither duplicate rows nor fail on "already exists"."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from facetrace.db.models import Image, Prompt, Rejection, Sighting, Source, utcnow


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
    rejected_names: list[str] = field(default_factory=list)  # the quarantined files (the inbox moves them)

    def add(self, other: BatchCounts) -> None:
        self.seen += other.seen
        self.new += other.new
        self.duplicate += other.duplicate
        self.rejected.update(other.rejected)
        self.new_image_ids.extend(other.new_image_ids)
        self.rejected_names.extend(other.rejected_names)

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


@dataclass(frozen=True)
class RejectedFile:
    """A file refused at ingest, with its reason code and what we know of its bytes."""

    original_name: str
    reason: str
    detail: str
    sha256: str | None = None
    size: int | None = None


class KnownImage(NamedTuple):
    id: int
    path: str
    label: str


def known_images(session: Session, sha256s: Iterable[str]) -> dict[str, KnownImage]:
    """{sha256: (image id, stored path, label)} for the digests the catalog already holds (a query per 500)."""
    wanted, found = sorted(set(sha256s)), {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        rows = session.execute(select(Image.sha256, Image.id, Image.path, Image.label).where(Image.sha256.in_(chunk)))
        found.update({sha: KnownImage(image_id, path, label) for sha, image_id, path, label in rows})
    return found


def quarantine_images(session: Session, sha256s: Iterable[str]) -> int:
    """Take images out of use (status quarantined: no snapshot includes them); returns how many changed."""
    wanted, changed = sorted(set(sha256s)), 0
    for start in range(0, len(wanted), 500):
        result = session.execute(update(Image).where(Image.sha256.in_(wanted[start:start + 500]),
                                                     Image.status != "quarantined").values(status="quarantined"))
        changed += result.rowcount or 0
    return changed


def add_images(
    session: Session, source_id: int, images: Sequence[AcceptedImage], flow_run_id: str | None = None,
    *, already: Sequence[tuple[str, int]] = (),
) -> tuple[list[int], int, list[AcceptedImage]]:
    """Catalogue a batch of stored images, with a sighting for every name.

    Returns (new ids, duplicates, conflicts): conflicts are images whose content another writer
    catalogued under the other label between the caller's look-up and this insert; they get no
    sighting (the caller records them as rejections). ``already`` holds (original name, image id) for
    files whose content the catalog already had: only their sightings are new. One statement per
    table, not per image, and rows go in sha256 and name order, so concurrent writers on PostgreSQL
    take row locks in the same order (no deadlock).
    """
    first: dict[str, AcceptedImage] = {}
    for image in sorted(images, key=lambda i: i.record.sha256):
        first.setdefault(image.record.sha256, image)
    new_ids: dict[str, int] = {}
    if first:
        rows = [_image_row(source_id, image, flow_run_id) for image in first.values()]
        stmt = (_insert(session, Image).on_conflict_do_nothing(index_elements=["sha256"])
                .returning(Image.sha256, Image.id))
        new_ids = {sha: image_id for sha, image_id in session.execute(stmt, rows)}
    existing = known_images(session, set(first) - set(new_ids))
    kept: list[AcceptedImage] = []
    conflicts: list[AcceptedImage] = []
    for image in images:
        known = existing.get(image.record.sha256)
        (conflicts if known is not None and known.label != image.label else kept).append(image)
    images = kept
    ids = {sha: known.id for sha, known in existing.items()}
    ids.update(new_ids)
    sightings = sorted({(image.original_name, ids[image.record.sha256]) for image in images} | set(already))
    if sightings:
        session.execute(
            _insert(session, Sighting).on_conflict_do_nothing(index_elements=["source_id", "original_name"]),
            [{"source_id": source_id, "original_name": name, "image_id": image_id, "flow_run_id": flow_run_id}
             for name, image_id in sightings],
        )
        # A file refused once (a truncated download, say) and whole now is no longer a rejection.
        names = [name for name, _ in sightings]
        for start in range(0, len(names), 500):
            session.execute(delete(Rejection).where(Rejection.source_id == source_id,
                                                    Rejection.original_name.in_(names[start:start + 500])))
    duplicates = len(images) + len(already) - len(new_ids)
    return sorted(new_ids.values()), duplicates, conflicts


def _image_row(source_id: int, image: AcceptedImage, flow_run_id: str | None) -> dict[str, Any]:
    rec = image.record
    return dict(
        sha256=rec.sha256, path=image.path, label=image.label, source_id=source_id,
        original_name=image.original_name, format=rec.format, mode=rec.mode, width=rec.width,
        height=rec.height, bytes=rec.bytes, phash=rec.phash, exif_orientation=rec.exif_orientation,
        frames=rec.frames, dedup_group=rec.sha256, prompt_id=image.prompt_id,
        provenance=image.provenance, status="ok", ingested_at=utcnow(), flow_run_id=flow_run_id,
    )


def add_rejections(session: Session, source_id: int, rejected: Sequence[RejectedFile],
                   flow_run_id: str | None = None) -> None:
    """Record quarantined files (once per source and name: a re-run adds nothing)."""
    if not rejected:
        return
    session.execute(
        _insert(session, Rejection).on_conflict_do_nothing(index_elements=["source_id", "original_name"]),
        [{"source_id": source_id, "original_name": r.original_name, "reason": r.reason, "detail": r.detail[:2000],
          "sha256": r.sha256, "bytes": r.size, "rejected_at": utcnow(), "flow_run_id": flow_run_id}
         for r in sorted(rejected, key=lambda r: r.original_name)],
    )


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
    if session.get_bind().dialect.name == "postgresql":
        # No unique key on prompt text: serialise concurrent importers of the same text instead.
        # (SQLite writers already hold the database lock from BEGIN IMMEDIATE.)
        session.execute(select(func.pg_advisory_xact_lock(74657202, zlib.crc32(text.encode()) - 2**31)))
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
