"""Who a customer is, for choosing a policy: consumer or business, country, region, their own
policy, and whether they are excluded from dunning.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("type", sa.String(length=16), nullable=False,
                                      server_default="business"))
        batch_op.add_column(sa.Column("country", sa.String(length=2), nullable=True))
        batch_op.add_column(sa.Column("region", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("policy", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("exclude", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("customers", schema=None) as batch_op:
        for column in ("exclude", "policy", "region", "country", "type"):
            batch_op.drop_column(column)
