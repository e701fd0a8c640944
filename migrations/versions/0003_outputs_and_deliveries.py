"""Outputs (our SR/SC/GSPS objects) and deliveries (the outbox).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 09:12:43.650754
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('outputs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('analysis_pk', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['analysis_pk'], ['analyses.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    op.create_index('ix_outputs_analysis_pk', 'outputs', ['analysis_pk'])
    op.create_table('deliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('output_pk', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['output_pk'], ['outputs.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_deliveries_output_pk', 'deliveries', ['output_pk'])
    op.create_index('ix_deliveries_status_next', 'deliveries', ['status', 'next_attempt_at'])


def downgrade() -> None:
    op.drop_index('ix_deliveries_status_next', table_name='deliveries')
    op.drop_index('ix_deliveries_output_pk', table_name='deliveries')
    op.drop_table('deliveries')
    op.drop_index('ix_outputs_analysis_pk', table_name='outputs')
    op.drop_table('outputs')
