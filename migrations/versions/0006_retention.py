"""Retention: when the pixel data of a received image, or an overlay we made, was purged.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 05:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('instances', sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('outputs', sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('outputs') as outputs:
        outputs.drop_column('purged_at')
    with op.batch_alter_table('instances') as instances:
        instances.drop_column('purged_at')
