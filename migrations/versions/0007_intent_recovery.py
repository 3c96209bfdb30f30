"""Intent recovery direction wide enough for every value the journal writes.

0003 sized ``intents.recovery`` for "forward" and "back"; reconcile and the CDI spec keeper later began to
write "forward-only" (12 characters).  SQLite ignores a VARCHAR length, so nothing failed there; PostgreSQL
refuses the row, so every reconcile that repaired a host - the libvirt hook's restore after a reboot among
them - failed on a shared inventory.

Revision ID: 0007_intent_recovery
Revises: 0006_host_stack
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0007_intent_recovery"
down_revision = "0006_host_stack"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("intents", schema=None) as batch_op:
        batch_op.alter_column("recovery", existing_type=sa.String(length=8), type_=sa.String(length=16),
                              existing_nullable=False)


def downgrade() -> None:
    # a 'forward-only' row cannot be kept in 8 characters; such an intent is reconcile's own and is finished by
    # running reconcile again, so it is settled as 'forward' (the direction it would take first anyway)
    op.execute("UPDATE intents SET recovery = 'forward' WHERE recovery = 'forward-only'")
    with op.batch_alter_table("intents", schema=None) as batch_op:
        batch_op.alter_column("recovery", existing_type=sa.String(length=16), type_=sa.String(length=8),
                              existing_nullable=False)
