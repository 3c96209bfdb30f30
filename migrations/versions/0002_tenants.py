"""Tenants with quotas; allocations track their VM's state; hosts remember a boot marker.

Revision ID: 0002_tenants
Revises: 0001_initial
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_tenants"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("max_instances", sa.Integer(), nullable=True),
        sa.Column("max_memory_mib", sa.BigInteger(), nullable=True),
        sa.Column("max_compute_slices", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tenants")),
    )
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("boot_marker", sa.String(length=64), nullable=True))
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vm_state", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("vm_state_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.drop_column("vm_state_at")
        batch_op.drop_column("vm_state")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("boot_marker")
    op.drop_table("tenants")
