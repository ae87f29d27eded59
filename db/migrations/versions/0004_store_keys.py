"""Store keys instead of absolute paths: models.path, models.model_card, validation_runs.data_docs and
the file paths inside models.metrics (reports, TensorBoard) and models.hyperparameters (ensemble
members) become keys relative to the artifact store, so any machine can resolve them.

Only paths under this catalog's data root are converted (the data root of the settings, and for a
SQLite catalog the folder that holds its file); the local store is that data root, so an existing
local catalog keeps working unchanged. Anything else (a path outside the data root) stays as it is:
the model loader still accepts an absolute path.

Revision ID: 0004
Revises: 0003
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TEXT_COLUMNS = {"models": ("path", "model_card"), "validation_runs": ("data_docs",)}
JSON_COLUMNS = {"models": ("metrics", "hyperparameters")}


def data_roots(connection) -> list[str]:
    """Absolute data roots whose paths become keys, longest first."""
    from facetrace.settings import get_settings

    roots = {str(Path(get_settings().data_dir).resolve())}
    if connection.dialect.name == "sqlite":
        database = connection.engine.url.database
        if database and database != ":memory:":
            roots.add(str(Path(database).resolve().parent))
    return sorted(roots, key=len, reverse=True)


def to_key(value: Any, roots: list[str]) -> Any:
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    for root in roots:
        if value.startswith(root + os.sep):
            return PurePosixPath(*Path(value[len(root) + 1:]).parts).as_posix()
    return value


def to_path(value: Any, root: str) -> Any:
    if not isinstance(value, str) or not value or os.path.isabs(value) or "://" in value:
        return value
    first = PurePosixPath(value).parts[0]
    return str(Path(root) / value) if first in ("models", "reports", "validation") else value


def walk(value: Any, convert) -> Any:
    if isinstance(value, dict):
        return {k: walk(v, convert) for k, v in value.items()}
    if isinstance(value, list):
        return [walk(v, convert) for v in value]
    return convert(value)


def rewrite(convert) -> None:
    connection = op.get_bind()
    for table, columns in TEXT_COLUMNS.items():
        for column in columns:
            rows = connection.execute(sa.text(f"SELECT id, {column} FROM {table} WHERE {column} IS NOT NULL")).all()
            for row_id, value in rows:
                new = convert(value)
                if new != value:
                    connection.execute(sa.text(f"UPDATE {table} SET {column} = :v WHERE id = :id"),
                                       {"v": new, "id": row_id})
    for table, columns in JSON_COLUMNS.items():
        for column in columns:
            rows = connection.execute(sa.text(f"SELECT id, {column} FROM {table} WHERE {column} IS NOT NULL")).all()
            for row_id, value in rows:
                data = json.loads(value) if isinstance(value, str) else value
                new = walk(data, convert)
                if new != data:
                    cast = "CAST(:v AS JSONB)" if connection.dialect.name == "postgresql" else ":v"
                    connection.execute(sa.text(f"UPDATE {table} SET {column} = {cast} WHERE id = :id"),
                                       {"v": json.dumps(new), "id": row_id})


def upgrade() -> None:
    roots = data_roots(op.get_bind())
    rewrite(lambda value: to_key(value, roots))


def downgrade() -> None:
    from facetrace.settings import get_settings

    root = str(Path(get_settings().data_dir).resolve())
    rewrite(lambda value: to_path(value, root))
