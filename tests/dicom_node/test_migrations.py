"""Alembic: upgrade from empty, downgrade, upgrade again, on SQLite and PostgreSQL; and the
migrated schema is exactly the ORM models' schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from dicom_node.db import migrate
from dicom_node.db.models import Base
from dicom_node.db.session import engine_for

TABLES = {"patients", "studies", "series", "instances", "instance_events", "analyses",
          "outputs", "deliveries", "findings", "study_reports", "api_tokens", "audit_log",
          "worker_heartbeats"}


def _tables(url: str) -> set[str]:
    return set(inspect(engine_for(url)).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    migrate.upgrade(database_url)
    assert _tables(database_url) == TABLES
    assert migrate.current_revision(database_url) == "0007"
    migrate.downgrade(database_url, "base")
    assert _tables(database_url) == set()
    assert migrate.current_revision(database_url) is None
    migrate.upgrade(database_url)
    assert _tables(database_url) == TABLES


def test_migrations_match_the_models(database_url: str) -> None:
    migrate.upgrade(database_url)
    with engine_for(database_url).connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
