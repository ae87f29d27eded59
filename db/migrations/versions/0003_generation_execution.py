"""generations.execution: how an image's batch ran, so CPU images regenerate byte for byte

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from facetrace.db.views import VIEWS, create_view_sql, drop_view_sql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("execution", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                      nullable=True)
        )


def downgrade() -> None:
    # SQLite drops a column by rebuilding the table, which it refuses while views name it.
    for name in VIEWS:
        op.execute(drop_view_sql(name))
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_column("execution")
    for name in VIEWS:
        op.execute(create_view_sql(name))
