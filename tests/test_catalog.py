"""The catalog's schema lives in Alembic migrations that match the models, on SQLite and PostgreSQL,
and its constraints are enforced by the database itself."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from facetrace.db.engine import make_engine, session_scope
from facetrace.db.migrate import alembic_config, downgrade, upgrade
from facetrace.db.models import Base, Image, Source
from facetrace.db.views import VIEWS


@pytest.fixture
def engine(catalog_url: str):
    engine = make_engine(catalog_url)
    yield engine
    engine.dispose()


def _tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def _views(engine) -> set[str]:
    return set(inspect(engine).get_view_names())


def test_upgrade_head_on_an_empty_catalog_creates_every_table_and_view(engine):
    assert _tables(engine) == set()
    upgrade(engine)
    assert _tables(engine) == set(Base.metadata.tables)
    assert set(VIEWS) <= _views(engine)


def test_models_match_the_migrations(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    upgrade(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"models and migrations differ; write a migration for: {diff}"


def test_downgrade_to_base_removes_everything_and_upgrade_restores_it(engine):
    upgrade(engine)
    downgrade(engine, "base")
    assert _tables(engine) == set()
    assert not (set(VIEWS) & _views(engine))
    upgrade(engine)
    assert _tables(engine) == set(Base.metadata.tables)


def test_the_migration_chain_is_linear(engine):
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, f"several migration heads: {heads}; chain new revisions after the current head"


def test_the_quick_head_check_agrees_with_alembic(catalog_url):
    """get_engine skips importing Alembic when the catalog is at the head read from the scripts' headers."""
    from alembic.script import ScriptDirectory

    from facetrace.db.engine import make_engine
    from facetrace.db.migrate import at_head, head_revisions

    assert head_revisions() == frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())
    engine = make_engine(catalog_url)
    assert not at_head(engine)  # a new catalog
    upgrade(engine, "0002")
    assert not at_head(engine)  # behind
    upgrade(engine)
    assert at_head(engine)
    engine.dispose()


def test_upgrade_is_idempotent(engine):
    upgrade(engine)
    upgrade(engine)  # a second process starting on a migrated catalog changes nothing
    assert _tables(engine) == set(Base.metadata.tables)


def _source(session) -> int:
    source = Source(kind="folder", reference="/faces")
    session.add(source)
    session.flush()
    return source.id


def _image(source_id: int, sha: str = "a" * 64, **overrides) -> Image:
    values = dict(sha256=sha, path=f"images/{sha[:2]}/{sha}.jpg", label="real", source_id=source_id,
                  original_name="x.jpg", format="JPEG", mode="RGB", width=10, height=10, bytes=100,
                  phash="0" * 16)
    values.update(overrides)
    return Image(**values)


@pytest.mark.parametrize("overrides, constraint", [
    ({"label": "cartoon"}, "label"),
    ({"status": "lost"}, "status"),
    ({"width": 0}, "positive_sizes"),
    ({"sha256": "abc", "path": "images/ab/abc.jpg"}, "sha256_length"),
    ({"provenance": "rumour"}, "provenance"),
])
def test_the_database_refuses_rows_that_break_a_rule(engine, overrides, constraint):
    upgrade(engine)
    with pytest.raises(IntegrityError, match=constraint):
        with session_scope(engine) as session:
            session.add(_image(_source(session), **overrides))


def test_one_row_per_content_and_sources_must_exist(engine):
    upgrade(engine)
    with session_scope(engine) as session:
        source_id = _source(session)
        session.add(_image(source_id))
    with pytest.raises(IntegrityError):
        with session_scope(engine) as session:
            session.add(_image(source_id, path="images/elsewhere.jpg"))  # same sha256
    with pytest.raises(IntegrityError):
        with session_scope(engine) as session:
            session.add(_image(source_id + 999, sha="b" * 64))  # foreign key
    with session_scope(engine) as session:
        assert session.scalars(select(Image.sha256)).all() == ["a" * 64]


def test_content_catalogued_under_the_other_label_meanwhile_comes_back_as_a_conflict(engine):
    """Two batches racing with the same bytes under different labels: the loser learns of it from
    add_images (no sighting under the wrong label), and quarantine takes the image out of use once."""
    from facetrace.db.catalog import AcceptedImage, add_images, quarantine_images
    from facetrace.db.models import Sighting
    from facetrace.tasks.storage import ImageRecord

    def accepted(sha: str, label: str, name: str) -> AcceptedImage:
        record = ImageRecord(sha256=sha, format="PNG", mode="RGB", width=10, height=10, bytes=100, phash="0" * 16,
                             exif_orientation=None, frames=1)
        return AcceptedImage(original_name=name, label=label, path=f"images/{sha[:2]}/{sha}.png", record=record)

    upgrade(engine)
    with session_scope(engine) as session:
        source_id = _source(session)
        session.add(_image(source_id))  # "a" * 64, real: the other writer's row
    with session_scope(engine) as session:
        offered = [accepted("a" * 64, "synthetic", "AI/a.png"), accepted("b" * 64, "synthetic", "AI/b.png")]
        new_ids, duplicates, conflicts = add_images(session, source_id, offered)
        assert len(new_ids) == 1 and duplicates == 0
        assert [(c.original_name, c.label) for c in conflicts] == [("AI/a.png", "synthetic")]
        assert session.scalars(select(Sighting.original_name)).all() == ["AI/b.png"]
        assert quarantine_images(session, ["a" * 64]) == 1 and quarantine_images(session, ["a" * 64]) == 0
    with session_scope(engine) as session:
        assert dict(session.execute(select(Image.sha256, Image.status)).all()) == {
            "a" * 64: "quarantined", "b" * 64: "ok"}
