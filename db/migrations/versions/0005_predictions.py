"""predictions: what the served champion said (`facetrace api`), and the predictions_daily view

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

from facetrace.db.views import create_view_sql, drop_view_sql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

VIEW = "predictions_daily"  # this migration's view only: views of older tables belong to 0002


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("label", sa.String(length=16), nullable=True),
        sa.Column("request_id", sa.String(length=36), nullable=True),
        sa.CheckConstraint("decision IN ('real', 'synthetic')", name=op.f("ck_predictions_decision")),
        sa.CheckConstraint("label IS NULL OR label IN ('real', 'synthetic')", name=op.f("ck_predictions_label")),
        sa.CheckConstraint("score >= 0 AND score <= 1", name=op.f("ck_predictions_score")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_predictions_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
    )
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_predictions_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_predictions_model_id"), ["model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_predictions_sha256"), ["sha256"], unique=False)
    op.execute(drop_view_sql(VIEW))
    op.execute(create_view_sql(VIEW))


def downgrade() -> None:
    op.execute(drop_view_sql(VIEW))
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_predictions_sha256"))
        batch_op.drop_index(batch_op.f("ix_predictions_model_id"))
        batch_op.drop_index(batch_op.f("ix_predictions_created_at"))
    op.drop_table("predictions")
