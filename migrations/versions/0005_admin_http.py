"""The admins' HTTP side: API tokens, the audit log, worker heartbeats, and the indexes the
results API's filters need (accession number, finding class, an instance's latest analysis).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 04:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('secret_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    sa.UniqueConstraint('secret_sha256')
    )
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('token_name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('client', sa.String(length=64), nullable=False),
    sa.Column('method', sa.String(length=8), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_audit_log_at', 'audit_log', ['at'])
    op.create_table('worker_heartbeats',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('bundle', sa.String(length=130), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_index('ix_studies_accession_number', 'studies', ['accession_number'])
    op.create_index('ix_findings_class_name', 'findings', ['class_name'])
    op.create_index('ix_analyses_instance_latest', 'analyses', ['instance_pk', 'id'])


def downgrade() -> None:
    op.drop_index('ix_analyses_instance_latest', table_name='analyses')
    op.drop_index('ix_findings_class_name', table_name='findings')
    op.drop_index('ix_studies_accession_number', table_name='studies')
    op.drop_table('worker_heartbeats')
    op.drop_index('ix_audit_log_at', table_name='audit_log')
    op.drop_table('audit_log')
    op.drop_table('api_tokens')
