"""Out of resources: the database down or the spool short of space answers 0xA700 (the sender
retries later), stores nothing, and the node recovers by itself."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from tests.support.node import DECODED, POSTGRES_ADMIN_URL, echo, instances, wait_until_settled
from training.synthetic import make_radiograph


def _store(port: int, path: Path) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
    assert assoc.is_established
    status = int(assoc.send_c_store(dcmread(path)).Status)
    assoc.release()
    return status


def _set_connections(database: str, allowed: bool) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s", (database,))


def test_database_down_answers_a700_then_recovers(tmp_path: Path, postgres_url: str,
                                                  start_node) -> None:
    node = start_node(postgres_url)
    database = postgres_url.rsplit("/", 1)[1]
    _set_connections(database, allowed=False)
    try:
        assert _store(node.port, make_radiograph(tmp_path / "down.dcm", seed=1)) == 0xA700
        assert echo(node.port) == 0
        assert [p for p in (node.data_dir / "spool").rglob("*.dcm")] == []
    finally:
        _set_connections(database, allowed=True)
    assert _store(node.port, make_radiograph(tmp_path / "up.dcm", seed=2)) == 0
    (row,) = wait_until_settled(postgres_url, 1)
    assert row.status == DECODED


@pytest.mark.parametrize("minimum_mb,status", [("1000000000", 0xA700), ("0", 0x0000)])
def test_spool_below_free_space_minimum_answers_a700(tmp_path: Path, sqlite_url: str,
                                                     start_node, minimum_mb: str,
                                                     status: int) -> None:
    node = start_node(sqlite_url, env={"SPINENODE_MIN_FREE_DISK_MB": minimum_mb})
    assert _store(node.port, make_radiograph(tmp_path / "a.dcm")) == status
    assert len(instances(sqlite_url)) == (1 if status == 0 else 0)
