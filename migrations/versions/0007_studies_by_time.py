"""Studies are listed by when their first image arrived: an index on that time.

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


def downgrade() -> None:
    op.drop_index('ix_studies_created_at', table_name='studies')
