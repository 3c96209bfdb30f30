"""Containers: a per-GPU mode (vm | containers) and the consumer kind of an allocation (vm | container).

GPUs that already carry a profile served VMs (the only consumers before this revision): they are recorded in
``vm`` mode; GPUs without a profile keep no mode (they take both kinds of attach).  Every existing allocation
is a VM's.

Revision ID: 0005_containers
Revises: 0004_health
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0005_containers"
down_revision = "0004_health"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gpus", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mode", sa.String(length=16), nullable=True))
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("consumer", sa.String(length=16), server_default="vm", nullable=False))
    op.execute(sa.text("UPDATE gpus SET mode = 'vm' WHERE desired_profile IS NOT NULL"))


def downgrade() -> None:
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.drop_column("consumer")
    with op.batch_alter_table("gpus", schema=None) as batch_op:
        batch_op.drop_column("mode")
