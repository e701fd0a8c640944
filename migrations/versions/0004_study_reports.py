"""Study reports (one SR per study, versioned); an output comes from an analysis or a report.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 01:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('study_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_pk', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=16), nullable=False),
    sa.Column('probability', sa.Float(), nullable=False),
    sa.Column('top_instance_pk', sa.Integer(), nullable=False),
    sa.Column('image_count', sa.Integer(), nullable=False),
    sa.Column('finding_count', sa.Integer(), nullable=False),
    sa.Column('analysis_ids', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_pk'], ['studies.id'], ),
    sa.ForeignKeyConstraint(['top_instance_pk'], ['instances.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_pk', 'version', name='uq_study_reports_study_version')
    )
    op.create_index('ix_study_reports_study_pk', 'study_reports', ['study_pk'])
    # Batch mode: SQLite changes a column's nullability by copying the table.
    with op.batch_alter_table('outputs') as outputs:
        outputs.alter_column('analysis_pk', existing_type=sa.Integer(), nullable=True)
        outputs.add_column(sa.Column('study_report_pk', sa.Integer(), nullable=True))
        outputs.create_foreign_key('fk_outputs_study_report_pk', 'study_reports',
                                   ['study_report_pk'], ['id'])
        outputs.create_index('ix_outputs_study_report_pk', ['study_report_pk'])


def downgrade() -> None:
    with op.batch_alter_table('outputs') as outputs:
        outputs.drop_index('ix_outputs_study_report_pk')
        outputs.drop_constraint('fk_outputs_study_report_pk', type_='foreignkey')
        outputs.drop_column('study_report_pk')
        outputs.alter_column('analysis_pk', existing_type=sa.Integer(), nullable=False)
    op.drop_index('ix_study_reports_study_pk', table_name='study_reports')
    op.drop_table('study_reports')
