"""Who may connect: allow-list entries of calling AE title and source address or network are
checked at the association request (DCMTK storescu as the sender); a rejection is logged with
AE, address and reason and counted; beyond the association cap a request is rejected (local
limit exceeded) until one ends; an idle association is dropped after the network timeout and a
connection that never asks for an association after the ACSE timeout."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.config import AllowedPeer, SettingsError, load_settings
from tests.support.node import storescu, wait_for
from tests.support.web import Http
from training.synthetic import make_radiograph


@pytest.mark.parametrize("entry, ae, address, admitted", [
    ("CT1", "CT1", "10.1.2.3", True),
    ("CT1@10.0.0.7", "CT1", "10.0.0.7", True),
    ("CT1@10.0.0.7", "CT1", "10.0.0.8", False),
    ("CT1@10.0.0.7", "CT2", "10.0.0.7", False),
    ("PACS@10.0.0.0/24", "PACS", "10.0.0.200", True),
    ("PACS@10.0.0.0/24", "PACS", "10.0.1.1", False),
    ("*@192.168.1.0/24", "ANYONE", "192.168.1.9", True),
    ("*@::1", "X", "::1", True),
])
def test_allow_list_entries(entry: str, ae: str, address: str, admitted: bool) -> None:
    assert AllowedPeer.parse(entry).admits(ae, address) is admitted


@pytest.mark.parametrize("value, message", [
    ("CT1@300.1.1.1", "not an IP address or network"),
    ("*", "allows everyone"),
    ("THIS-TITLE-IS-TOO-LONG@10.0.0.1", "not a valid AE title"),
])
def test_bad_allow_list_entries_name_the_setting(monkeypatch: pytest.MonkeyPatch, value: str,
                                                 message: str) -> None:
    monkeypatch.setenv("SPINENODE_ALLOWED_CALLING_AES", value)
    with pytest.raises(SettingsError, match="SPINENODE_ALLOWED_CALLING_AES") as raised:
        load_settings()
    assert message in str(raised.value)


def test_allow_list_by_ae_and_address_and_idle_timeout(tmp_path: Path, postgres_url: str,
                                                       start_node) -> None:
    node = start_node(postgres_url, env={
        "SPINENODE_ALLOWED_CALLING_AES": "CT1@127.0.0.1,PACS@10.0.0.0/8,MODALITY,*@192.168.0.0/16",
        "SPINENODE_NETWORK_TIMEOUT_SECONDS": "2", "SPINENODE_ACSE_TIMEOUT_SECONDS": "2",
        "SPINENODE_MAX_ASSOCIATIONS": "1"})
    image = make_radiograph(tmp_path / "a.dcm")

    def send(calling: str, called: str = "SPINENODE"):  # noqa: ANN202
        return storescu(node.port, [image], "-aet", calling, called_ae=called)

    assert send("CT1").returncode == 0  # its title, from its address
    refused = send("PACS")  # its title, but not from its network
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr
    assert "Calling AE Title Not Recognized" in refused.stderr
    assert send("STRANGER").returncode != 0
    wrong_called = send("CT1", called="SOMEONE")
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr

    log = wait_for(lambda: node.log() if node.log().count("association rejected") == 3
                   else None, 10, what="three rejections logged")
    assert re.search(r"association rejected: calling AE 'PACS' from 127\.0\.0\.1 to called AE "
                     r"'SPINENODE': not-allowed", log)
    assert "calling AE 'CT1' from 127.0.0.1 to called AE 'SOMEONE': called-ae" in log
    metrics = Http(node.http_port).ok("/metrics")
    assert 'spinenode_associations_rejected_total{reason="not-allowed"} 2.0' in metrics
    assert 'spinenode_associations_rejected_total{reason="called-ae"} 1.0' in metrics

    # An association that says nothing is dropped once the network timeout has passed. While
    # it is open the node is at its cap of one: the next request is rejected, transiently.
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SPINENODE")
    assert assoc.is_established
    began = time.monotonic()
    over_cap = ae.associate("127.0.0.1", node.port, ae_title="SPINENODE")
    assert over_cap.is_rejected and assoc.is_established
    wait_for(lambda: not assoc.is_established, 15, interval=0.1, what="the idle association "
             "dropped")
    assert 1.5 < time.monotonic() - began < 10
    # Below the cap again once the node's side of it has ended too (a moment later).
    wait_for(lambda: send("CT1").returncode == 0, 10, interval=0.2, what="a free association")

    # A connection that never sends an association request is closed after the ACSE timeout.
    with socket.create_connection(("127.0.0.1", node.port), timeout=15) as silent:
        began = time.monotonic()
        assert silent.recv(1) == b""
    assert 1.5 < time.monotonic() - began < 10
