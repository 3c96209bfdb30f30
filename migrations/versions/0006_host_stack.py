"""Host stack: what each host runs as far as moving VMs between hosts cares (host driver, hypervisor release,
kernel, QEMU, libvirt, the vGPU version range), one row per host, rewritten whenever the host is recorded.

Revision ID: 0006_host_stack
Revises: 0005_containers
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0006_host_stack"
down_revision = "0005_containers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "host_stack",
        sa.Column("host_id", sa.String(length=253), nullable=False),
        sa.Column("driver", sa.String(length=64), nullable=True),
        sa.Column("os", sa.String(length=64), nullable=True),
        sa.Column("kernel", sa.String(length=128), nullable=True),
        sa.Column("qemu", sa.String(length=32), nullable=True),
        sa.Column("libvirt", sa.String(length=32), nullable=True),
        sa.Column("vgpu_min", sa.BigInteger(), nullable=True),
        sa.Column("vgpu_max", sa.BigInteger(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"], name=op.f("fk_host_stack_host_id_hosts"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("host_id", name=op.f("pk_host_stack")),
    )


def downgrade() -> None:
    op.drop_table("host_stack")
