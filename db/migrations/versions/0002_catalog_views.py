"""catalog views for common questions

Revision ID: 0002
Revises: 0001
"""
from alembic import op

from facetrace.db.views import VIEWS, create_view_sql, drop_view_sql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for name in VIEWS:
        op.execute(drop_view_sql(name))
        op.execute(create_view_sql(name))


def downgrade() -> None:
    for name in VIEWS:
        op.execute(drop_view_sql(name))
