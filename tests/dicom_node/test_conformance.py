"""docs/conformance.md says exactly what the node does: the SOP classes and transfer syntaxes
its SCP accepts (read from the SCP's own AE) and the ones its sender proposes (what a peer is
asked for when the sender sends each object the node makes)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import Verification

from dicom_node.analysis import AnalysisResult, Classification, FindingBox
from dicom_node.cli.common import free_port
from dicom_node.config import Destination, load_settings
from dicom_node.db.session import session_factory
from dicom_node.outbox import send_file
from dicom_node.results.gsps import build_gsps
from dicom_node.results.overlay import build_overlay
from dicom_node.results.sr import build_sr
from dicom_node.scp import StoreSCP
from training.synthetic import make_radiograph

STATEMENT = Path(__file__).parents[2] / "docs" / "conformance.md"


def table(heading: str) -> list[list[str]]:
    """The rows (cells) of the table under a heading of the statement."""
    text = STATEMENT.read_text().split(f"#### {heading}\n", 1)[1]
    block = next(part for part in text.split("\n\n") if part.lstrip("\n").startswith("|"))
    rows = [line for line in block.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def uids(cells: str) -> set[str]:
    return set(re.findall(r"\d+(?:\.\d+)+", cells))


def test_the_scp_accepts_what_the_statement_lists(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    scp = StoreSCP(settings, session_factory(f"sqlite:///{tmp_path / 'db.sqlite'}"),
                   lambda instance_id: None)
    contexts = {str(cx.abstract_syntax): set(map(str, cx.transfer_syntax))
                for cx in scp.ae.supported_contexts}
    listed_classes = {row[1] for row in table("SOP classes as SCP")}
    assert listed_classes == set(contexts)
    storage_syntaxes = set().union(*(syntaxes for uid, syntaxes in contexts.items()
                                     if uid != Verification))
    assert {row[1] for row in table("Transfer syntaxes as SCP")} == storage_syntaxes
    assert contexts[Verification] == set(DEFAULT_TRANSFER_SYNTAXES)


def test_the_sender_proposes_what_the_statement_lists(tmp_path: Path) -> None:
    """What outbox.send_file really proposes, as a peer sees it, for each object we make."""
    source = dcmread(make_radiograph(tmp_path / "dx.dcm", rows=200, columns=150))
    classification = Classification({"densenet121": 0.7}, {}, 0.7, 0.5, True)
    result = AnalysisResult("b", "1", False, classification,
                            [FindingBox("Osteophytes", 0.8, 10, 10, 50, 50)])
    grey = np.zeros((200, 150), dtype=np.uint8)
    made = [build_sr([(source, result)]), build_overlay(source, grey, result),
            build_overlay(source, grey, result, jpeg=True),
            build_gsps(source, result, window=(2048, 4096))]
    proposed: dict[str, set[str]] = {Verification: set(DEFAULT_TRANSFER_SYNTAXES)}

    def requested(event: evt.Event) -> None:
        for context in event.assoc.requestor.requested_contexts:
            proposed.setdefault(str(context.abstract_syntax), set()).update(
                map(str, context.transfer_syntax))

    peer = AE(ae_title="PEER")
    peer.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_REQUESTED, requested),
                                             (evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        for index, ds in enumerate(made):
            path = tmp_path / f"{index}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sent = send_file(path, Destination(ae_title="PEER", host="127.0.0.1", port=port),
                             "SPINENODE", 16384)
            assert sent.delivered, sent.reason
    finally:
        server.shutdown()
    listed = {row[1]: uids(row[2]) for row in table("SOP classes as SCU")}
    assert listed == proposed
    # The JPEG SC is also offered uncompressed; the others only as they are stored.
    assert proposed[str(made[2].SOPClassUID)] == {str(made[2].file_meta.TransferSyntaxUID),
                                                   ExplicitVRLittleEndian}
