"""Contact rules: when each delivery contacted the customer (frequency caps count it), and a
customer's time zone may be unknown (derived from the phone number, or the policy's default).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("contact_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.alter_column("timezone", existing_type=sa.String(length=64), nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.alter_column("timezone", existing_type=sa.String(length=64), nullable=False)
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("contact_at")
