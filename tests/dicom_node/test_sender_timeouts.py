"""The sender waits for a PACS only as long as the timeout settings say: a peer that takes the
association and then does not answer the C-STORE costs the DIMSE timeout, not the default
minute (and with a longer timeout the same peer's answer is taken). A DICOMweb server that
takes the request and does not answer costs the same, and a peer that does not take the
connection at all (a firewall that drops it) costs the ACSE timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from dicom_node.cli import main
from dicom_node.cli.common import free_port
from dicom_node.config import Destination
from dicom_node.outbox import Timeouts, send_file, stow_file
from tests.support.fault_peers import dropping_connections, http_answering
from training.synthetic import make_radiograph

ANSWERS_AFTER = 3.0  # seconds the peer takes to answer each C-STORE


def test_a_silent_peer_costs_the_dimse_timeout(tmp_path: Path) -> None:
    image = make_radiograph(tmp_path / "dx.dcm", rows=64, columns=48)

    def slow(event: evt.Event) -> int:
        time.sleep(ANSWERS_AFTER)
        return 0x0000

    peer = AE(ae_title="SLOWPACS")
    peer.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, slow)])
    destination = Destination(ae_title="SLOWPACS", host="127.0.0.1", port=port)
    try:
        began = time.monotonic()
        impatient = send_file(image, destination, "SPINENODE", 16384,
                              Timeouts(acse=5, dimse=1, network=5))
        waited = time.monotonic() - began
        assert not impatient.delivered and not impatient.permanent  # tried again later
        assert impatient.reason == f"no C-STORE response from {destination.address}"
        assert 0.9 < waited < ANSWERS_AFTER
        patient = send_file(image, destination, "SPINENODE", 16384,
                            Timeouts(acse=5, dimse=ANSWERS_AFTER + 5, network=30))
        assert patient.delivered, patient.reason
    finally:
        server.shutdown()


def test_a_silent_dicomweb_server_costs_the_dimse_timeout(tmp_path: Path) -> None:
    image = make_radiograph(tmp_path / "dx.dcm", rows=64, columns=48)
    # Busy, after a while: what matters is whether the answer was waited for.
    with http_answering(503, after=ANSWERS_AFTER) as (server, _):
        url = f"{server}/dicom-web"
        began = time.monotonic()
        impatient = stow_file(image, Destination.parse(url), None,
                              Timeouts(acse=5, dimse=1, network=5))
        waited = time.monotonic() - began
        assert not impatient.delivered and not impatient.permanent  # tried again later
        assert impatient.reason == f"no answer from {url} (ReadTimeout)"
        assert 0.9 < waited < ANSWERS_AFTER
        patient = stow_file(image, Destination.parse(url), None,
                            Timeouts(acse=5, dimse=ANSWERS_AFTER + 5, network=30))
        assert patient.reason == f"{url} answered HTTP 503"


def test_a_peer_that_does_not_take_the_connection_costs_the_acse_timeout(tmp_path: Path) -> None:
    image = make_radiograph(tmp_path / "dx.dcm", rows=64, columns=48)
    timeouts = Timeouts(acse=1, dimse=30, network=60)
    with dropping_connections() as port:
        destination = Destination(ae_title="PACS", host="127.0.0.1", port=port)
        began = time.monotonic()
        result = send_file(image, destination, "SPINENODE", 16384, timeouts)
        assert time.monotonic() - began < 10
        assert not result.delivered and not result.permanent
        assert result.reason == f"no association with {destination.address} (peer down or " \
                                "unreachable)"
        url = f"http://127.0.0.1:{port}/dicom-web"
        began = time.monotonic()
        result = stow_file(image, Destination.parse(url), None, timeouts)
        assert time.monotonic() - began < 10
        assert result.reason == f"no answer from {url} (ConnectTimeout)"


def test_echo_answers_and_gives_up_after_the_acse_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # `spinenode echo`, an admin's check of a peer or of the node.
    monkeypatch.setenv("SPINENODE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SPINENODE_ACSE_TIMEOUT_SECONDS", "1")
    peer = AE(ae_title="PACS")
    peer.add_supported_context(Verification)
    server = peer.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]
        assert main(["echo", "--port", str(port), "--ae-title", "PACS"]) == 0
        assert capsys.readouterr().out == f"C-ECHO PACS@127.0.0.1:{port}: status 0x0000\n"
    finally:
        server.shutdown()
    with dropping_connections() as port:
        began = time.monotonic()
        assert main(["echo", "--port", str(port)]) == 2
        assert time.monotonic() - began < 10
    assert capsys.readouterr().err == f"spinenode: no association with SPINENODE@127.0.0.1:{port}\n"
