"""Orthanc (Debian's package) plays the PACS: a modality stores to Orthanc, Orthanc auto-routes
every stored instance to the node (Lua OnStoredInstance), and the node's SR, SC and GSPS arrive
back in the same study. Orthanc routes those to the node too: they are never analysed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.db.models import Analysis
from dicom_node.db.session import session_factory
from tests.support.node import free_port, storescu, wait_for, wait_until_settled
from tests.support.orthanc import Orthanc
from tests.support.samples import make_radiograph


@pytest.fixture
def orthanc_for(tmp_path: Path) -> Iterator:
    started: list[Orthanc] = []

    def start(node_port: int) -> Orthanc:
        started.append(Orthanc(tmp_path / "orthanc", node_port))
        return started[-1]

    yield start
    for orthanc in started:
        orthanc.stop()


def test_results_come_back_to_orthanc_and_rerouting_is_harmless(
        tmp_path: Path, sqlite_url: str, test_bundle: Path, start_node, orthanc_for) -> None:
    node_port = free_port()  # Orthanc must know where to route before the node starts
    orthanc = orthanc_for(node_port)
    start_node(sqlite_url, port=node_port, env={
        "SPINENODE_BUNDLE": str(test_bundle),
        "SPINENODE_DESTINATIONS": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}/sr+sc+gsps",
        "SPINENODE_ROUTE_MODALITIES": "CR,DX,OT",  # so the returned SC is a real loop test
    })
    source = make_radiograph(tmp_path / "spine.dcm")
    study_uid = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    result = storescu(orthanc.dicom_port, [source], called_ae="ORTHANC")
    assert result.returncode == 0, result.stderr

    def four_in_study() -> list[dict] | None:
        found = orthanc.study_instances(study_uid)
        return found if len(found) >= 4 else None

    found = wait_for(four_in_study, 180, interval=1, what="SR, SC and GSPS in Orthanc")
    modalities = sorted(orthanc.get(f"/instances/{i['ID']}/simplified-tags")["Modality"]
                        for i in found)
    assert modalities == ["DX", "OT", "PR", "SR"]
    # Orthanc sent our three objects back to the node as well: stored, skipped, not analysed.
    rows = wait_until_settled(sqlite_url, 4, timeout=120)
    assert sorted(row.status for row in rows) == ["done", "skipped", "skipped", "skipped"]
    assert all("loop guard" in row.reason for row in rows if row.status == "skipped")
    with session_factory(sqlite_url)() as session:
        assert session.scalar(select(func.count(Analysis.id))) == 1
