"""DICOM TLS in and out against DCMTK built with OpenSSL: storescu over TLS into the node (a
client certificate the node's CA signed stores; a self-signed one, or none, is refused), the
node's results sent over TLS to storescp that demands our certificate, and a node that takes
TLS only refuses plain connections and TLS older than 1.2, and (client certificates optional)
stores from a sender without one but still refuses an untrusted one. Certificates are made in
the test; the node runs on PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from pydicom import dcmread

from dicom_node.cli.common import free_port
from tests.support.node import storescu, wait_for
from tests.support.pki import make_pki
from training.synthetic import make_radiograph


def _handshake(port: int, *version: str) -> bool:
    """Whether OpenSSL's own client completes a handshake with the given protocol flag (and
    every cipher allowed, so only the server can say no)."""
    probe = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *version,
                            "-cipher", "DEFAULT:@SECLEVEL=0"], input=b"", capture_output=True,
                           timeout=30)
    return probe.returncode == 0 and b"BEGIN CERTIFICATE" in probe.stdout


def test_dicom_tls_in_and_out(tmp_path: Path, postgres_url: str, start_node,
                              test_bundle: Path) -> None:
    ca, ids = make_pki(tmp_path / "pki", ("node", "pacs", "modality"))
    received = tmp_path / "pacs"
    received.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(  # requires and verifies the sender's certificate (DCMTK default)
        ["storescp", "+tls", str(ids["pacs"].key), str(ids["pacs"].cert), "+cf", str(ca),
         "-aet", "PACS", "+uf", "-od", str(received), str(pacs_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tls_port = free_port()
    try:
        node = start_node(postgres_url, env={
            "SPINENODE_TLS_PORT": str(tls_port), "SPINENODE_TLS_CERTFILE": str(ids["node"].cert),
            "SPINENODE_TLS_KEYFILE": str(ids["node"].key), "SPINENODE_TLS_CA_FILE": str(ca),
            "SPINENODE_BUNDLE": str(test_bundle),
            "SPINENODE_DESTINATIONS": f"PACS@127.0.0.1:{pacs_port};tls"})
        image = make_radiograph(tmp_path / "a.dcm")
        trusted = ("+tls", str(ids["modality"].key), str(ids["modality"].cert), "+cf", str(ca))
        stored = storescu(tls_port, [image], *trusted)
        assert stored.returncode == 0, stored.stderr
        rogue = ("+tls", str(ids["rogue"].key), str(ids["rogue"].cert), "+cf", str(ca))
        assert storescu(tls_port, [image], *rogue).returncode != 0
        assert storescu(tls_port, [image], "+tla", "+cf", str(ca)).returncode != 0  # no cert
        assert storescu(tls_port, [image]).returncode != 0  # plain DICOM on the TLS port
        assert "(DICOM TLS)" in node.log()

        # The SC overlay and the study's SR go to the PACS over TLS, with our certificate.
        def arrived() -> list[str]:
            kinds = sorted(dcmread(p, stop_before_pixels=True).Modality
                           for p in received.iterdir() if p.is_file())
            return kinds if kinds == ["OT", "SR"] else []
        wait_for(arrived, 120, interval=1, what="the SC and SR at the TLS PACS")
        node.stop()
    finally:
        pacs.terminate()
        pacs.wait(10)

    # TLS only: the plain port is not even open; TLS still stores. Client certificates are
    # optional here: a sender without one stores, one with an untrusted one is still refused.
    tls_only = start_node(postgres_url, env={
        "SPINENODE_TLS_ONLY": "true", "SPINENODE_TLS_PORT": str(free_port()),
        "SPINENODE_TLS_CERTFILE": str(ids["node"].cert),
        "SPINENODE_TLS_KEYFILE": str(ids["node"].key), "SPINENODE_TLS_CA_FILE": str(ca),
        "SPINENODE_TLS_REQUIRE_CLIENT_CERT": "false"})
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", tls_only.port)) != 0
    port = int(tls_only.env["SPINENODE_TLS_PORT"])
    again = make_radiograph(tmp_path / "b.dcm", seed=3)
    assert storescu(port, [again], *trusted).returncode == 0
    anonymous = make_radiograph(tmp_path / "c.dcm", seed=4)
    assert storescu(port, [anonymous], "+tla", "+cf", str(ca)).returncode == 0
    assert storescu(port, [make_radiograph(tmp_path / "d.dcm", seed=5)], *rogue).returncode != 0
    # BCP 195: TLS 1.2 or newer. OpenSSL's client gets through with 1.2 and not with 1.1.
    assert _handshake(port, "-tls1_2")
    assert not _handshake(port, "-tls1_1")
