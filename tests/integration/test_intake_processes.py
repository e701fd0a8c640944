"""Several intake processes on one port (intake_processes = 2, SO_REUSEPORT), on PostgreSQL:
both processes listen on the plain and the TLS port and take associations (which process took
one is read off the server side of its connection), and DCMTK's storescu stores over TLS; each
process stores and queues what it takes; the allow-list holds in both; /metrics adds up both
processes' counts; a second node started by mistake on the same port is refused; a child that
dies is started again; a child whose parent dies stops."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from dicom_node.cli.common import free_port
from tests.support.node import (
    DECODED,
    SPINENODE,
    NodeProcess,
    storescu,
    wait_for,
    wait_until_settled,
)
from tests.support.pki import make_pki
from tests.support.web import Http
from training.synthetic import make_radiograph


def _connections(node: NodeProcess) -> Iterator[tuple[int, psutil._common.pconn]]:
    """(pid, TCP connection) of the node's processes, skipping one that ends meanwhile (the
    embedded worker starts and ends processes of its own)."""
    root = psutil.Process(node.process.pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        for conn in connections:
            yield process.pid, conn


def _listening(node: NodeProcess, port: int) -> set[int]:
    """Process ids of the node's processes that listen on PORT."""
    return {pid for pid, conn in _connections(node)
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port}


def _taker(node: NodeProcess, client_port: int) -> int | None:
    """The process id of the node's process that holds the connection from CLIENT_PORT."""
    return next((pid for pid, conn in _connections(node)
                 if conn.raddr and conn.raddr.port == client_port), None)


def _one_association_each(node: NodeProcess, port: int, pids: set[int],
                          tls: tuple[ssl.SSLContext, str] | None = None
                          ) -> dict[int, Association]:
    """Associations opened until each of PIDS took one (the kernel picks by a hash of the
    connection: 40 tries all landing on one of two processes has odds of 2**-39)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    held: dict[int, Association] = {}
    extra = []
    for _ in range(40):
        assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE", tls_args=tls)
        assert assoc.is_established
        client_port = assoc.dul.socket.socket.getsockname()[1]
        pid = wait_for(lambda port=client_port: _taker(node, port), 10,
                       what="the association's taker")
        if pid in held:
            extra.append(assoc)
        else:
            held[pid] = assoc
        if set(held) == pids:
            break
    for assoc in extra:
        assoc.release()
    assert set(held) == pids, f"associations went only to {set(held)} of {pids}"
    return held


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(line_start))


def test_two_intake_processes_share_the_ports(tmp_path: Path, postgres_url: str,
                                              start_node) -> None:
    ca, ids = make_pki(tmp_path / "pki", ("node", "modality"))
    tls_port = free_port()
    node = start_node(postgres_url, env={
        "SPINENODE_INTAKE_PROCESSES": "2", "SPINENODE_ALLOWED_CALLING_AES": "MODALITY",
        "SPINENODE_TLS_PORT": str(tls_port), "SPINENODE_TLS_CERTFILE": str(ids["node"].cert),
        "SPINENODE_TLS_KEYFILE": str(ids["node"].key), "SPINENODE_TLS_CA_FILE": str(ca)})
    wait_for(lambda: f"listening on 0.0.0.0:{node.port} and 0.0.0.0:{tls_port} (DICOM TLS) "
             "in 2 processes" in node.log(), 30, what="the start-up line")
    pids = wait_for(lambda: len(_listening(node, node.port)) == 2 and _listening(node, node.port),
                    60, what="two processes listening")
    assert _listening(node, tls_port) == pids

    # Each process stores what it takes, over plain DICOM and over TLS.
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    client.load_cert_chain(str(ids["modality"].cert), str(ids["modality"].key))
    sent = []
    for port, tls in ((node.port, None), (tls_port, (client, "localhost"))):
        for pid, assoc in _one_association_each(node, port, pids, tls).items():
            image = make_radiograph(tmp_path / f"{port}-{pid}.dcm", seed=len(sent))
            status = assoc.send_c_store(dcmread(image))
            assert status.Status == 0x0000, f"process {pid}: {status}"
            assoc.release()
            sent.append(image)
    # And a DICOM TLS peer of another make, DCMTK's storescu, to whichever process takes it.
    image = make_radiograph(tmp_path / "dcmtk.dcm", seed=len(sent))
    stored = storescu(tls_port, [image], "+tls", str(ids["modality"].key),
                      str(ids["modality"].cert), "+cf", str(ca))
    assert stored.returncode == 0, stored.stderr
    sent.append(image)
    rows = wait_until_settled(node.database_url, len(sent))
    assert sorted(row.sop_instance_uid for row in rows) == sorted(
        dcmread(image).SOPInstanceUID for image in sent)
    assert {row.status for row in rows} == {DECODED}  # each process queued what it stored

    # The allow-list holds in both; /metrics adds up both processes' counts.
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(Verification)
    for _ in range(6):
        assert stranger.associate("127.0.0.1", node.port, ae_title="SPINENODE").is_rejected
    http = Http(node.http_port)

    def counted() -> str | None:
        text = http.ok("/metrics")
        return text if _metric(text, "spinenode_associations_rejected_total") == 6 else None
    metrics = wait_for(counted, 10, what="six rejections counted")
    stored = 'spinenode_c_store_requests_total{calling_ae="MODALITY",status="0x0000"}'
    assert _metric(metrics, stored) == len(sent)
    assert _metric(metrics, "spinenode_received_bytes_total") == sum(
        row.size_bytes for row in rows)
    assert _metric(metrics, "spinenode_intake_processes ") == 2

    # A second node on the same port is refused, as a plain listener would be.
    second = subprocess.run([*SPINENODE, "serve", "--no-worker"], capture_output=True, text=True,
                            timeout=60, env={**node.env, "SPINENODE_DATA_DIR": str(tmp_path / "b"),
                                             "SPINENODE_HTTP_PORT": "0"})
    assert second.returncode == 2
    assert (f"cannot listen on 0.0.0.0 port {node.port} or TLS port {tls_port}: Address already "
            "in use") in second.stderr

    # A child that dies is started again.
    (child,) = pids - {node.process.pid}
    os.kill(child, signal.SIGKILL)
    again = wait_for(lambda: (listening := _listening(node, node.port)) and len(listening) == 2
                     and child not in listening and listening, 30,
                     what="the intake process started again")
    assert node.process.pid in again
    restarted = f"intake process {child} exited with -9; starting it again"
    wait_for(lambda: restarted in node.log(), 10, what=f"{restarted!r} in {node.log()[-2000:]}")

    # A child whose parent dies stops (it would hold the port for no node).
    (child,) = again - {node.process.pid}
    os.kill(node.process.pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status()
             == psutil.STATUS_ZOMBIE, 30, what="the orphaned intake process to stop")
    node.kill()  # the embedded worker
