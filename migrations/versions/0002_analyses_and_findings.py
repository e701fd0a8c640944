"""Analyses and findings; room in instances.status for "waiting-for-model".

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 08:39:52.739033
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('analyses',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('instance_pk', sa.Integer(), nullable=False),
    sa.Column('source_sha256', sa.String(length=64), nullable=False),
    sa.Column('bundle_name', sa.String(length=64), nullable=False),
    sa.Column('bundle_version', sa.String(length=64), nullable=False),
    sa.Column('clinical_use', sa.Boolean(), nullable=False),
    sa.Column('member_probabilities', sa.JSON(), nullable=False),
    sa.Column('probability', sa.Float(), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('label', sa.String(length=16), nullable=False),
    sa.Column('decode_seconds', sa.Float(), nullable=False),
    sa.Column('classify_seconds', sa.Float(), nullable=False),
    sa.Column('detect_seconds', sa.Float(), nullable=False),
    sa.Column('device', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['instance_pk'], ['instances.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('instance_pk', 'source_sha256', 'bundle_name', 'bundle_version',
                        name='uq_analyses_instance_source_bundle')
    )
    op.create_index('ix_analyses_instance_pk', 'analyses', ['instance_pk'])
    op.create_table('findings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('analysis_pk', sa.Integer(), nullable=False),
    sa.Column('class_index', sa.Integer(), nullable=False),
    sa.Column('class_name', sa.String(length=64), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('x0', sa.Float(), nullable=False),
    sa.Column('y0', sa.Float(), nullable=False),
    sa.Column('x1', sa.Float(), nullable=False),
    sa.Column('y1', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['analysis_pk'], ['analyses.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_findings_analysis_pk', 'findings', ['analysis_pk'])
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.alter_column('status',
               existing_type=sa.VARCHAR(length=16),
               type_=sa.String(length=24),
               existing_nullable=False)


def downgrade() -> None:
    # The old schema has no such status: those instances go back to be analysed.
    op.execute("UPDATE instances SET status = 'received' WHERE status = 'waiting-for-model'")
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.alter_column('status',
               existing_type=sa.String(length=24),
               type_=sa.VARCHAR(length=16),
               existing_nullable=False)

    op.drop_index('ix_findings_analysis_pk', table_name='findings')
    op.drop_table('findings')
    op.drop_index('ix_analyses_instance_pk', table_name='analyses')
    op.drop_table('analyses')
