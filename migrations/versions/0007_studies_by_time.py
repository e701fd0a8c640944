"""Indexes for time: studies are listed by when their first image arrived, and the study
reporter looks only at images whose status changed since its last round.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 17:20:00
"""

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_studies_created_at', 'studies', ['created_at'])
    op.create_index('ix_instances_updated_at', 'instances', ['updated_at'])


def downgrade() -> None:
    op.drop_index('ix_instances_updated_at', table_name='instances')
    op.drop_index('ix_studies_created_at', table_name='studies')
