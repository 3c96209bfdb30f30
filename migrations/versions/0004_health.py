"""Health per GPU and per instance, and a bounded history of health events (XIDs, resets, recoveries).

Revision ID: 0004_health
Revises: 0003_intents
Create Date: 2026-12-02

Written against 0002_tenants; revision 0003 is developed in parallel, and this revision's down_revision is
re-chained onto it when both are merged (the revision touches no table 0003 adds).
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_health"
down_revision = "0003_intents"
branch_labels = None
depends_on = None


def _health_columns() -> list[sa.Column]:
    return [
        sa.Column("health", sa.String(length=16), server_default=sa.text("'healthy'"), nullable=False),
        sa.Column("health_since", sa.DateTime(), nullable=True),
        sa.Column("health_last_at", sa.DateTime(), nullable=True),
        sa.Column("health_reason", sa.Text(), nullable=True),
        sa.Column("health_needs_reset", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    ]


def upgrade() -> None:
    for table in ("gpus", "instances"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for col in _health_columns():
                batch_op.add_column(col)
            batch_op.create_index(f"ix_{table}_health", ["health"], unique=False)
    op.create_table(
        "health_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("host_id", sa.String(length=253), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("gpu_id", sa.Integer(), nullable=True),
        sa.Column("gpu_address", sa.String(length=64), nullable=True),
        sa.Column("instance_id", sa.Integer(), nullable=True),
        sa.Column("xid", sa.BigInteger(), nullable=True),
        sa.Column("gi_id", sa.BigInteger(), nullable=True),
        sa.Column("ci_id", sa.BigInteger(), nullable=True),
        sa.Column("severity", sa.String(length=16), nullable=True),
        sa.Column("scope", sa.String(length=16), nullable=True),
        sa.Column("vm_name", sa.String(length=255), nullable=True),
        sa.Column("vm_uuid", sa.String(length=36), nullable=True),
        sa.Column("tenant", sa.String(length=128), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"], name=op.f("fk_health_events_host_id_hosts"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["gpu_id"], ["gpus.id"], name=op.f("fk_health_events_gpu_id_gpus"),
                                ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"],
                                name=op.f("fk_health_events_instance_id_instances"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_health_events")),
    )
    with op.batch_alter_table("health_events", schema=None) as batch_op:
        batch_op.create_index("ix_health_events_host_at", ["host_id", "at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("health_events", schema=None) as batch_op:
        batch_op.drop_index("ix_health_events_host_at")
    op.drop_table("health_events")
    for table in ("instances", "gpus"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f"ix_{table}_health")
            for name in ("health_needs_reset", "health_reason", "health_last_at", "health_since", "health"):
                batch_op.drop_column(name)
