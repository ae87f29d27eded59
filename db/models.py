"""The catalog: typed SQLAlchemy 2.0 models with their constraints in the database.

Every row a flow writes carries the Prefect flow run id (``flow_run_id``) so the UI and SQL meet.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names make Alembic migrations portable between SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")

LABELS = ("real", "synthetic")
IMAGE_STATUSES = ("ok", "quarantined")
PROVENANCE = ("complete", "partial", "none")
SPLITS = ("train", "validation", "test")
STAGES = ("candidate", "champion", "archived")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType}


class Source(Base):
    """Where images came from: a Kaggle dataset, a folder, a zip, the bundled sample, a generator."""

    __tablename__ = "sources"
    __table_args__ = (
        UniqueConstraint("kind", "reference", name="uq_sources_kind_reference"),
        CheckConstraint(_in("kind", ("kaggle", "folder", "zip", "sample", "generated", "import")), name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    reference: Mapped[str] = mapped_column(String(1024))
    version: Mapped[str | None] = mapped_column(String(128))
    license: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None]
    fetched_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))

    images: Mapped[list[Image]] = relationship(back_populates="source")


class Image(Base):
    """One stored image, once per content (sha256)."""

    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint(_in("label", LABELS), name="label"),
        CheckConstraint(_in("status", IMAGE_STATUSES), name="status"),
        CheckConstraint(f"provenance IS NULL OR {_in('provenance', PROVENANCE)}", name="provenance"),
        CheckConstraint("length(sha256) = 64", name="sha256_length"),
        CheckConstraint("width > 0 AND height > 0 AND bytes > 0", name="positive_sizes"),
        Index("ix_images_label_status", "label", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(512), unique=True)
    label: Mapped[str] = mapped_column(String(16))
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"), index=True)
    original_name: Mapped[str] = mapped_column(String(1024))
    format: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    phash: Mapped[str] = mapped_column(String(16), index=True)
    exif_orientation: Mapped[int | None] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    dedup_group: Mapped[str | None] = mapped_column(String(64))
    prompt_id: Mapped[int | None] = mapped_column(ForeignKey("prompts.id"), index=True)
    provenance: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="ok")
    ingested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))

    source: Mapped[Source] = relationship(back_populates="images")
    prompt: Mapped[Prompt | None] = relationship()
    generation: Mapped[Generation | None] = relationship(back_populates="image")


class Sighting(Base):
    """Every name under which a source showed an image: duplicates are recorded, never lost."""

    __tablename__ = "sightings"
    __table_args__ = (UniqueConstraint("source_id", "original_name", name="uq_sightings_source_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    original_name: Mapped[str] = mapped_column(String(1024))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))


class Rejection(Base):
    """A file that could not be used, with the reason (quarantine record)."""

    __tablename__ = "rejections"
    __table_args__ = (UniqueConstraint("source_id", "original_name", name="uq_rejections_source_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"), index=True)
    original_name: Mapped[str] = mapped_column(String(1024))
    reason: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    rejected_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))


class Prompt(Base):
    """A face description, with how it was made (LLM model and parameters, template and seed, import)."""

    __tablename__ = "prompts"
    __table_args__ = (CheckConstraint(_in("method", ("llm", "template", "import")), name="method"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    negative_text: Mapped[str | None] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(16))
    style: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128))
    template: Mapped[str | None] = mapped_column(Text)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    parameters: Mapped[dict[str, Any] | None]
    attributes: Mapped[dict[str, Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))


class Generation(Base):
    """Everything needed to regenerate a synthetic image."""

    __tablename__ = "generations"
    __table_args__ = (
        UniqueConstraint("request_key", "item_index", name="uq_generations_request_item"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), unique=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    request_key: Mapped[str] = mapped_column(String(64))
    item_index: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(String(512))
    model_revision: Mapped[str | None] = mapped_column(String(128))
    model_hash: Mapped[str | None] = mapped_column(String(64))
    pipeline_class: Mapped[str] = mapped_column(String(128))
    scheduler_class: Mapped[str] = mapped_column(String(128))
    scheduler_config: Mapped[dict[str, Any]]
    steps: Mapped[int] = mapped_column(Integer)
    guidance: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    device: Mapped[str] = mapped_column(String(32))
    safety_checker: Mapped[str | None] = mapped_column(String(64))
    library_versions: Mapped[dict[str, Any]]
    duration_s: Mapped[float | None] = mapped_column(Float)
    # How the batch ran (its members' seeds and prompts, this image's position, CPU threads): on CPU
    # a pipeline's output depends on the batch's shape, so exact regeneration replays the whole batch.
    execution: Mapped[dict[str, Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))

    image: Mapped[Image] = relationship(back_populates="generation")
    prompt: Mapped[Prompt] = relationship()


class ValidationRun(Base):
    __tablename__ = "validation_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    suite: Mapped[str] = mapped_column(String(128))
    success: Mapped[bool] = mapped_column(Boolean)
    critical_failure: Mapped[bool] = mapped_column(Boolean, default=False)
    statistics: Mapped[dict[str, Any] | None]
    results: Mapped[list[Any] | None]
    data_docs: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))


class Snapshot(Base):
    """The exact set of images (and their split) a model was trained on."""

    __tablename__ = "snapshots"

    id: Mapped[int] = mapped_column(primary_key=True)
    seed: Mapped[int] = mapped_column(Integer)
    parameters: Mapped[dict[str, Any] | None]
    image_count: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))

    members: Mapped[list[SnapshotImage]] = relationship(back_populates="snapshot", cascade="all, delete-orphan")


class SnapshotImage(Base):
    __tablename__ = "snapshot_images"
    __table_args__ = (CheckConstraint(_in("split", SPLITS), name="split"),)

    snapshot_id: Mapped[int] = mapped_column(ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    split: Mapped[str] = mapped_column(String(16))
    group_key: Mapped[str] = mapped_column(String(64))

    snapshot: Mapped[Snapshot] = relationship(back_populates="members")
    image: Mapped[Image] = relationship()


class Model(Base):
    """A trained detector in the registry."""

    __tablename__ = "models"
    __table_args__ = (
        CheckConstraint(_in("stage", STAGES), name="stage"),
        UniqueConstraint("backbone", "version", name="uq_models_backbone_version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    backbone: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    snapshot_id: Mapped[int] = mapped_column(ForeignKey("snapshots.id"), index=True)
    image_size: Mapped[int] = mapped_column(Integer)
    hyperparameters: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any] | None]
    threshold: Mapped[float | None] = mapped_column(Float)
    stage: Mapped[str] = mapped_column(String(16), default="candidate")
    model_card: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))

    snapshot: Mapped[Snapshot] = relationship()


# Only one champion at a time, enforced by the database (partial unique index; SQLite >= 3.8 and PostgreSQL).
Index(
    "uq_models_one_champion",
    Model.stage,
    unique=True,
    sqlite_where=Model.stage == "champion",
    postgresql_where=Model.stage == "champion",
)


DECISIONS = LABELS  # a detector's decision names a label


class Prediction(Base):
    """What the served champion said about one input (written by `facetrace api`, off the request path).

    ``label`` is what the caller knew, when it knew it: decisions against it are the disagreements.
    """

    __tablename__ = "predictions"
    __table_args__ = (
        CheckConstraint(_in("decision", DECISIONS), name="decision"),
        CheckConstraint(f"label IS NULL OR {_in('label', LABELS)}", name="label"),
        CheckConstraint("score >= 0 AND score <= 1", name="score"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    score: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(16))
    request_id: Mapped[str | None] = mapped_column(String(36))
