"""Concurrent associations, the admin commands, and a node killed with work in flight."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from tests.support.node import DECODED, SPINENODE, instances, storescu, wait_until_settled
from training.synthetic import make_radiograph

ASSOCIATIONS = 8
PER_ASSOCIATION = 3


def _send_batch(port: int, files: list[Path]) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(dcmread(path)).Status) for path in files]
    assoc.release()
    return statuses


def test_eight_concurrent_associations(tmp_path: Path, database_url: str, start_node) -> None:
    node = start_node(database_url)
    batches = [
        [make_radiograph(tmp_path / f"{a}-{i}.dcm", rows=128, columns=96, seed=a * 10 + i)
         for i in range(PER_ASSOCIATION)]
        for a in range(ASSOCIATIONS)
    ]
    with ThreadPoolExecutor(ASSOCIATIONS) as pool:
        results = list(pool.map(lambda files: _send_batch(node.port, files), batches))
    assert results == [[0] * PER_ASSOCIATION] * ASSOCIATIONS
    rows = wait_until_settled(database_url, ASSOCIATIONS * PER_ASSOCIATION)
    assert len(rows) == ASSOCIATIONS * PER_ASSOCIATION
    assert {row.status for row in rows} == {DECODED}


def _cli(node, *args: str) -> str:
    env = {**os.environ, "SPINENODE_DATA_DIR": str(node.data_dir),
           "SPINENODE_DATABASE_URL": node.database_url}
    result = subprocess.run([*SPINENODE, *args], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_status_and_instances_commands(tmp_path: Path, sqlite_url: str, start_node) -> None:
    node = start_node(sqlite_url)
    spine = make_radiograph(tmp_path / "spine.dcm")
    chest = make_radiograph(tmp_path / "chest.dcm", body_part="CHEST")
    assert storescu(node.port, [spine, chest]).returncode == 0
    wait_until_settled(sqlite_url, 2)
    status = json.loads(_cli(node, "status", "--json"))
    assert status["instances"][DECODED] == 1 and status["instances"]["skipped"] == 1
    assert status["queue_depth"] == 0
    done = json.loads(_cli(node, "instances", "--status", DECODED, "--json"))
    assert [row["sop_instance_uid"] for row in done] == [
        str(dcmread(spine, stop_before_pixels=True).SOPInstanceUID)]
    assert done[0]["rows"] == 256 and done[0]["columns"] == 200
    assert json.loads(_cli(node, "instances", "--since", "1h", "--json")).__len__() == 2
    assert json.loads(_cli(node, "instances", "--since", "2999-01-01", "--json")) == []
    table = _cli(node, "instances")
    assert "skipped" in table and "CHEST" in table


def test_node_killed_after_acknowledging_loses_nothing(tmp_path: Path, sqlite_url: str,
                                                       start_node) -> None:
    # No worker: the images wait in the embedded queue when the power goes.
    node = start_node(sqlite_url, args=("--no-worker",))
    files = [make_radiograph(tmp_path / f"{i}.dcm", seed=i) for i in range(4)]
    assert storescu(node.port, files).returncode == 0
    node.kill()
    assert len(instances(sqlite_url)) == 4
    restarted = start_node(sqlite_url)  # with its embedded worker this time
    rows = wait_until_settled(sqlite_url, 4)
    assert [row.status for row in rows] == [DECODED] * 4
    assert restarted.port != node.port
