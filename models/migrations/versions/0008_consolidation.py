"""Consolidation: the contacts each run plans, and shared messages standing for several of one
customer's invoices.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "planned_contacts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("customer_id", sa.String(length=64), nullable=False),
        sa.Column("invoice_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.String(length=200), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("invoice_id", "step", name="uq_planned_step"),
    )
    op.create_index("ix_planned_contacts_customer_id", "planned_contacts", ["customer_id"])
    op.create_table(
        "bundles",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("customer_id", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("send_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sender_invoice_id", sa.String(length=64), nullable=True),
        sa.Column("provider_message_id", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_bundles_customer_id", "bundles", ["customer_id"])
    op.create_table(
        "bundle_members",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("invoice_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.String(length=200), nullable=False),
        sa.Column("pay_url", sa.String(length=2048), nullable=False),
        sa.UniqueConstraint("bundle_id", "invoice_id", name="uq_bundle_member"),
    )
    op.create_index("ix_bundle_members_bundle_id", "bundle_members", ["bundle_id"])


def downgrade() -> None:
    op.drop_table("bundle_members")
    op.drop_table("bundles")
    op.drop_table("planned_contacts")
