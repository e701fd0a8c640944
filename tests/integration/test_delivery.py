"""Results back to a PACS: DCMTK storescp (and a strict pynetdicom SCP) as the peer."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from tests.support.node import (
    SPINENODE,
    deliveries,
    free_port,
    instances,
    storescu,
    wait_for,
    wait_until_settled,
)
from tests.support.samples import make_radiograph

FAST_RETRY = {"SPINENODE_DELIVERY_RETRY_SECONDS": "1",
              "SPINENODE_DELIVERY_MAX_BACKOFF_SECONDS": "2"}


def _storescp(folder: Path, port: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    # +xa: accept every transfer syntax (storescp takes uncompressed only by default).
    process = subprocess.Popen(["storescp", "+xa", "-aet", "PACS", "-od", str(folder),
                                str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process


def _deliveries(node) -> list[dict]:  # noqa: ANN001
    return deliveries(node.database_url)


def _node_env(test_bundle: Path, destination: str) -> dict[str, str]:
    return {"SPINENODE_BUNDLE": str(test_bundle), "SPINENODE_DESTINATIONS": destination,
            **FAST_RETRY}


def test_results_arrive_in_the_same_study(tmp_path: Path, sqlite_url: str, test_bundle: Path,
                                          start_node) -> None:
    pacs_port = free_port()
    pacs = _storescp(tmp_path / "pacs", pacs_port)
    try:
        node = start_node(sqlite_url, env=_node_env(
            test_bundle, f"PACS@127.0.0.1:{pacs_port}/sr+sc-jpeg+gsps"))
        source = make_radiograph(tmp_path / "spine.dcm")
        assert storescu(node.port, [source]).returncode == 0
        wait_for(lambda: [d["status"] for d in _deliveries(node)] == ["delivered"] * 3, 120,
                 what="three deliveries")
    finally:
        pacs.terminate()
    # What an admin lists is what the tests poll.
    listed = subprocess.run([*SPINENODE, "deliveries", "--json"], env=node.env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == _deliveries(node)
    received = [dcmread(path) for path in (tmp_path / "pacs").iterdir()]
    study = dcmread(source, stop_before_pixels=True).StudyInstanceUID
    assert sorted(ds.Modality for ds in received) == ["OT", "PR", "SR"]
    assert {ds.StudyInstanceUID for ds in received} == {study}
    sc = next(ds for ds in received if ds.Modality == "OT")
    assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"  # sc-jpeg asked for


def test_pacs_down_then_back(tmp_path: Path, sqlite_url: str, test_bundle: Path,
                             start_node) -> None:
    pacs_port = free_port()  # nothing listens yet
    node = start_node(sqlite_url, env=_node_env(test_bundle, f"PACS@127.0.0.1:{pacs_port}"))
    assert storescu(node.port, [make_radiograph(tmp_path / "spine.dcm")]).returncode == 0
    wait_for(lambda: (rows := _deliveries(node)) and len(rows) == 2
             and all(r["attempts"] >= 2 and r["status"] != "delivered" for r in rows), 120,
             what="failed attempts while the PACS is down")
    assert all("peer down or unreachable" in row["last_error"] for row in _deliveries(node))
    pacs = _storescp(tmp_path / "pacs", pacs_port)
    try:
        wait_for(lambda: [r["status"] for r in _deliveries(node)] == ["delivered"] * 2, 120,
                 what="deliveries once the PACS is back")
    finally:
        pacs.terminate()
    assert len(list((tmp_path / "pacs").iterdir())) == 2


class StrictPACS:
    """Takes Secondary Capture only, and answers each C-STORE with a chosen status."""

    def __init__(self, status: int):
        self.status = status
        self.port = free_port()
        self.received: list[Dataset] = []
        ae = AE(ae_title="PACS")
        ae.add_supported_context(SecondaryCaptureImageStorage)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.lock = threading.Lock()

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            if self.status == 0:
                self.received.append(event.dataset)
            return self.status

    def stop(self) -> None:
        self.server.shutdown()


def test_refused_sop_class_and_failure_status_are_dead_letters(
        tmp_path: Path, sqlite_url: str, test_bundle: Path, start_node) -> None:
    pacs = StrictPACS(status=0xC123)
    try:
        node = start_node(sqlite_url, env=_node_env(test_bundle,
                                                    f"PACS@127.0.0.1:{pacs.port}"))
        assert storescu(node.port, [make_radiograph(tmp_path / "spine.dcm")]).returncode == 0
        wait_for(lambda: [r["status"] for r in _deliveries(node)] == ["failed"] * 2, 120,
                 what="two dead letters")
        rows = {row["kind"]: row for row in _deliveries(node)}
        assert "refused Comprehensive 3D SR Storage" in rows["sr"]["last_error"]
        assert "answered 0xc123" in rows["sc"]["last_error"]
        assert rows["sr"]["attempts"] == rows["sc"]["attempts"] == 1  # no point retrying

        # The PACS is fixed; an admin sends the failed ones again.
        with pacs.lock:
            pacs.status = 0
        env = {**os.environ, "SPINENODE_DATA_DIR": str(node.data_dir),
               "SPINENODE_DATABASE_URL": node.database_url}
        result = subprocess.run([*SPINENODE, "deliveries", "retry", "--all-failed"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "2 deliveries queued again" in result.stdout
        wait_for(lambda: {r["kind"]: r["status"] for r in _deliveries(node)}
                 == {"sr": "failed", "sc": "delivered"}, 120, what="the SC delivered")
        assert len(pacs.received) == 1
    finally:
        pacs.stop()


def test_our_objects_routed_back_are_not_analysed(tmp_path: Path, sqlite_url: str,
                                                  test_bundle: Path, start_node) -> None:
    node = start_node(sqlite_url, env={"SPINENODE_BUNDLE": str(test_bundle),
                                       "SPINENODE_ROUTE_MODALITIES": "CR,DX,OT"})
    assert storescu(node.port, [make_radiograph(tmp_path / "spine.dcm")]).returncode == 0
    wait_until_settled(sqlite_url, 1, timeout=120)
    # SR (the study's, once it is quiet) and SC, kept although no destination is configured.
    def both_objects() -> list[Path] | None:
        found = sorted((node.data_dir / "outputs").glob("*.dcm"))
        return found if len(found) == 2 else None

    outputs = wait_for(both_objects, 60, what="the SR and the SC")
    # A PACS routes our SR and SC back to us (SC is OT, which this node now analyses).
    assert storescu(node.port, outputs, "-R").returncode == 0  # -R: propose what they are
    rows = wait_until_settled(sqlite_url, 3, timeout=120)
    returned = [row for row in rows if row.id > 1]
    assert [row.status for row in returned] == ["skipped", "skipped"]
    assert all("loop guard" in row.reason for row in returned)
    assert len(instances(sqlite_url)) == 3


@pytest.mark.parametrize("text", ["PACS@h:104/sr+bogus", "PACS@h:104/sc+sc-jpeg"])
def test_bad_destination_objects_are_refused(text: str) -> None:
    from dicom_node.config import SettingsError, load_settings

    with pytest.raises(SettingsError, match="SPINENODE_DESTINATIONS"):
        load_settings(destinations=text)


def test_reply_to_the_calling_ae_and_backoff() -> None:
    from dicom_node.config import load_settings
    from dicom_node.outbox import backoff_seconds, destinations_for

    settings = load_settings(destinations="PACS@10.0.0.5:104",
                             reply_to_calling_ae="CT1@10.0.0.7:104/sr,PACS@10.0.0.5:104",
                             delivery_retry_seconds=30, delivery_max_backoff_seconds=3600)
    assert [str(d) for d in destinations_for(settings, "CT1")] == ["PACS@10.0.0.5:104",
                                                                    "CT1@10.0.0.7:104/sr"]
    assert [str(d) for d in destinations_for(settings, "CR2")] == ["PACS@10.0.0.5:104"]
    # The PACS is not sent the same object twice because it also asked for replies.
    assert len(destinations_for(settings, "PACS")) == 1
    assert [backoff_seconds(settings, n) for n in (1, 2, 3, 4, 10)] == [30, 60, 120, 240, 3600]
    # Retries come with jitter: within 20 % of the backoff, and not all the same.
    from dicom_node.outbox import retry_delay

    delays = [retry_delay(settings, 2) for _ in range(200)]
    assert all(48 <= delay <= 72 for delay in delays) and len(set(delays)) > 100


def test_a_pacs_that_takes_no_jpeg_gets_the_overlay_uncompressed(
        tmp_path: Path, sqlite_url: str, test_bundle: Path, start_node) -> None:
    folder, pacs_port = tmp_path / "pacs", free_port()
    folder.mkdir()
    # storescp without +xa accepts uncompressed transfer syntaxes only.
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(folder), str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        node = start_node(sqlite_url, env=_node_env(
            test_bundle, f"PACS@127.0.0.1:{pacs_port}/sc-jpeg"))
        assert storescu(node.port, [make_radiograph(tmp_path / "spine.dcm")]).returncode == 0
        wait_for(lambda: [d["status"] for d in _deliveries(node)] == ["delivered"], 120,
                 what="the SC delivered")
        (received,) = list(folder.iterdir())
        ds = dcmread(received)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # Explicit VR LE
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns, 3)
        # What the node keeps (and would send a JPEG-capable peer) is still the JPEG.
        output = node.data_dir / "outputs" / f"{ds.SOPInstanceUID}.dcm"
        assert dcmread(output).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    finally:
        pacs.terminate()
        pacs.wait(10)
