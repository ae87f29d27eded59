"""Alembic migrations, run programmatically: the catalog upgrades itself on first use.

Alembic itself (a few hundred milliseconds to import) loads only when a catalog is behind: an
up-to-date one is recognised by one query against the head revision read from the scripts' headers.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
_REVISION = re.compile(r"""^(down_revision|revision)\s*(?::[^=]*)?=\s*(?:['"]([^'"]+)['"]|None)""", re.M)


@functools.lru_cache(maxsize=1)
def head_revisions() -> frozenset[str]:
    """Revisions no other script builds on, from the `revision = ...` lines of the migration scripts."""
    revisions, parents = set(), set()
    for script in (MIGRATIONS / "versions").glob("*.py"):
        found = dict((key, value) for key, value in _REVISION.findall(script.read_text()))
        if found.get("revision"):
            revisions.add(found["revision"])
            if found.get("down_revision"):
                parents.add(found["down_revision"])
    return frozenset(revisions - parents)


def at_head(engine: Engine) -> bool:
    """True when the catalog's recorded revision is the scripts' single head (no upgrade to run)."""
    heads = head_revisions()
    if len(heads) != 1:
        return False  # branches or unreadable headers: let Alembic decide
    try:
        with engine.connect() as connection:
            current = {row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))}
    except DBAPIError:  # no table yet: a new catalog
        return False
    return current == set(heads)


def alembic_config(engine: Engine | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    config = alembic_config(engine)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Two processes migrating one fresh catalog at once: the second waits for the first.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(74657201)")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    from alembic import command

    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
