"""Initial inventory schema: hosts, GPUs, instances, profiles, allocations, events.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = '0001_initial'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('host_id', sa.String(length=253), nullable=True),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=255), nullable=True),
    sa.Column('result', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events'))
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_host_id'), ['host_id'], unique=False)

    op.create_table('hosts',
    sa.Column('id', sa.String(length=253), nullable=False),
    sa.Column('hostname', sa.String(length=253), nullable=False),
    sa.Column('root', sa.Text(), nullable=False),
    sa.Column('simulated', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hosts'))
    )
    op.create_table('profiles',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('source', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_profiles'))
    )
    op.create_table('gpus',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('host_id', sa.String(length=253), nullable=False),
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('uuid', sa.String(length=64), nullable=True),
    sa.Column('nvml_index', sa.Integer(), nullable=True),
    sa.Column('model', sa.String(length=64), nullable=True),
    sa.Column('name', sa.String(length=128), nullable=True),
    sa.Column('vendor', sa.String(length=16), nullable=False),
    sa.Column('memory_mib', sa.Integer(), nullable=False),
    sa.Column('mig_capable', sa.Boolean(), nullable=False),
    sa.Column('mig_current', sa.Boolean(), nullable=True),
    sa.Column('mig_pending', sa.Boolean(), nullable=True),
    sa.Column('vgpu_interface', sa.String(length=16), nullable=True),
    sa.Column('sriov_total_vfs', sa.Integer(), nullable=True),
    sa.Column('sriov_num_vfs', sa.Integer(), nullable=True),
    sa.Column('present', sa.Boolean(), nullable=False),
    sa.Column('desired_profile', sa.String(length=128), nullable=True),
    sa.Column('profile_state', sa.String(length=32), nullable=True),
    sa.Column('last_seen_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['desired_profile'], ['profiles.name'], name=op.f('fk_gpus_desired_profile_profiles'), onupdate='CASCADE', ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_gpus_host_id_hosts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_gpus')),
    sa.UniqueConstraint('host_id', 'address', name='uq_gpus_host_address')
    )
    with op.batch_alter_table('gpus', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_gpus_host_id'), ['host_id'], unique=False)

    op.create_table('instances',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('host_id', sa.String(length=253), nullable=False),
    sa.Column('gpu_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('origin', sa.String(length=16), nullable=False),
    sa.Column('persistent', sa.Boolean(), nullable=False),
    sa.Column('profile_id', sa.Integer(), nullable=True),
    sa.Column('profile_name', sa.String(length=64), nullable=True),
    sa.Column('placement_start', sa.Integer(), nullable=True),
    sa.Column('placement_size', sa.Integer(), nullable=True),
    sa.Column('gi_id', sa.Integer(), nullable=True),
    sa.Column('ci_id', sa.Integer(), nullable=True),
    sa.Column('mig_uuid', sa.String(length=64), nullable=True),
    sa.Column('compute_slices', sa.Integer(), nullable=True),
    sa.Column('mdev_uuid', sa.String(length=36), nullable=True),
    sa.Column('parent', sa.String(length=64), nullable=True),
    sa.Column('type_id', sa.String(length=64), nullable=True),
    sa.Column('type_name', sa.String(length=128), nullable=True),
    sa.Column('memory_mib', sa.Integer(), nullable=True),
    sa.Column('backing_instance_id', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['backing_instance_id'], ['instances.id'], name=op.f('fk_instances_backing_instance_id_instances'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['gpu_id'], ['gpus.id'], name=op.f('fk_instances_gpu_id_gpus'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_instances_host_id_hosts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instances')),
    sa.UniqueConstraint('host_id', 'mdev_uuid', name='uq_instances_host_mdev_uuid')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instances_gpu_id'), ['gpu_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_instances_host_id'), ['host_id'], unique=False)
        batch_op.create_index('ix_instances_host_kind_state', ['host_id', 'kind', 'state'], unique=False)

    op.create_table('allocations',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.Integer(), nullable=False),
    sa.Column('host_id', sa.String(length=253), nullable=False),
    sa.Column('vm_name', sa.String(length=255), nullable=False),
    sa.Column('vm_uuid', sa.String(length=36), nullable=True),
    sa.Column('tenant', sa.String(length=128), nullable=True),
    sa.Column('persistent', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_allocations_host_id_hosts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], name=op.f('fk_allocations_instance_id_instances'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_allocations')),
    sa.UniqueConstraint('instance_id', name='uq_allocations_instance_id')
    )
    with op.batch_alter_table('allocations', schema=None) as batch_op:
        batch_op.create_index('ix_allocations_host_vm', ['host_id', 'vm_name'], unique=False)
        batch_op.create_index(batch_op.f('ix_allocations_tenant'), ['tenant'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('allocations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_allocations_tenant'))
        batch_op.drop_index('ix_allocations_host_vm')

    op.drop_table('allocations')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_host_kind_state')
        batch_op.drop_index(batch_op.f('ix_instances_host_id'))
        batch_op.drop_index(batch_op.f('ix_instances_gpu_id'))

    op.drop_table('instances')
    with op.batch_alter_table('gpus', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_gpus_host_id'))

    op.drop_table('gpus')
    op.drop_table('profiles')
    op.drop_table('hosts')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_host_id'))
        batch_op.drop_index(batch_op.f('ix_events_at'))

    op.drop_table('events')
