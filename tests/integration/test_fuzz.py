"""A slice of the fuzz corpus (tests/support/fuzz.py) against a running node on PostgreSQL.

The full corpus (2,000 inputs) runs in ``benchmarks/fuzz.py``; this slice takes every 13th
input, so every family and most mutations are in it. Each input is one association sent byte
for byte; the node must answer it with a PS3.4 status or a clean abort, answer C-ECHO after it,
hold its memory, keep what it writes in its spool, and bring every image it acknowledged to an
end (analysed or failed), none left on the way.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.intake import is_valid_uid
from tests.support.fuzz import SEED, corpus, good_input, replay, run_campaign
from tests.support.node import files_outside, wait_until_settled

SLICE = range(0, 2000, 13)


def test_fuzz_slice_is_answered_and_the_node_stays_up(tmp_path: Path, postgres_url: str,
                                                      start_node) -> None:
    made = tmp_path / "corpus"
    items = [item for item in corpus(SEED, 2000, made) if item.index in SLICE]
    node = start_node(postgres_url)
    # Warm up: the worker started and a decode done, so that memory is measured from there.
    assert replay(node.port, good_input(made)).status == 0
    wait_until_settled(postgres_url, 1, timeout=120)
    allowed = (node.data_dir / "spool", node.data_dir / "queue", made)
    before = files_outside(tmp_path, *allowed)
    campaign = run_campaign(node.port, node.process.pid, items)
    assert campaign.sent == len(SLICE)
    assert campaign.problems == []
    assert campaign.echo_failures == []
    assert campaign.answered == campaign.sent
    # Every family was in the slice, and each got refusals as well as acknowledgements where
    # it can: a slice that only ever met one branch would prove little.
    families = {family for family, _, _ in campaign.replies}
    assert {"bomb", "command", "p-data", "association", "cut", "deep_sequence"} <= families
    assert 0 < campaign.acknowledged < campaign.sent
    # Memory: the 64 MiB deflate bombs are refused in bounded memory; nothing accumulates.
    assert campaign.rss_peak - campaign.rss_first < 400 * 2**20, campaign
    new = {p for p in files_outside(tmp_path, *allowed) - before if p.suffix != ".log"}
    assert not new, new
    # What was acknowledged ends analysed (waiting for a model here) or failed, not stuck.
    rows = wait_until_settled(postgres_url, 1, timeout=120)
    assert len(rows) <= 1 + campaign.acknowledged  # the warm-up; duplicates are not kept twice
    assert all(is_valid_uid(row.sop_instance_uid) for row in rows)  # no odd UID got in


def test_what_pynetdicom_left_hanging_is_answered(tmp_path: Path, sqlite_url: str,
                                                  start_node) -> None:
    """Each of dicom_node/pynetdicom_fixes.py's cases, alone: without the fix, each holds an
    association open with no answer (until a timeout or for good)."""
    from tests.support import ul
    from tests.support.fuzz import DX, EXPLICIT
    from tests.support.node import echo

    node = start_node(sqlite_url)
    store = ul.c_store(DX, "1.2.3.4", b"")
    # A context proposing no transfer syntax: rejected; the C-STORE on it then aborted.
    reply = ul.converse(node.port, ul.associate_rq(DX, [""]), store, answer_within=10)
    assert reply.kind == "abort", reply
    # A response nobody asked for (C-STORE-RSP, command field 0x8001): aborted, not ignored.
    response = ul.p_data((ul.COMMAND | ul.LAST, ul.command_set(
        AffectedSOPClassUID=DX, CommandField=0x8001, MessageIDBeingRespondedTo=1,
        CommandDataSetType=0x0101, Status=0, AffectedSOPInstanceUID="1.2.3.4")))
    reply = ul.converse(node.port, ul.associate_rq(DX, [EXPLICIT]), response, answer_within=10)
    assert reply.kind == "abort", reply
    # A PDV too short to hold its own header: aborted (pynetdicom's reactor thread used to die).
    empty_pdv = b"\x04\x00" + (5).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x01"
    reply = ul.converse(node.port, ul.associate_rq(DX, [EXPLICIT]), empty_pdv, answer_within=10)
    assert reply.kind == "abort", reply
    # A C-STORE whose command names no storage SOP class (not even a UID): refused with a
    # status (pynetdicom aborted it), its streamed data set removed.
    incoming = node.data_dir / "spool" / "incoming"
    before = set(incoming.iterdir())  # an aborted C-STORE's file waits for the reconciler
    for sop_class in ("1.2.840.10008.5.1.4.1.1.1.1.x", "A" * 64):
        command = ul.command_set(AffectedSOPClassUID=sop_class, CommandField=0x0001,
                                 MessageID=1, Priority=0, CommandDataSetType=0x0000,
                                 AffectedSOPInstanceUID="1.2.3.4")
        payload = ul.p_data((ul.COMMAND | ul.LAST, command)) + ul.p_data(
            (ul.DATASET | ul.LAST, b"\x08\x00\x16\x00UI\x04\x001.2\x00"))
        reply = ul.converse(node.port, ul.associate_rq(DX, [EXPLICIT]), payload,
                            answer_within=10)
        assert (reply.kind, reply.status) == ("status", 0x0122), reply
    assert set(incoming.iterdir()) == before
    # More undecodable association requests than the node takes associations at once (16):
    # each ends at once, so the next peer is not locked out for the ACSE timeout.
    bad_called = ul.associate_rq(DX, [EXPLICIT], called="SPIN\xc9NODE")
    for _ in range(20):
        assert ul.converse(node.port, bad_called, b"", answer_within=10).kind == "abort"
    assert echo(node.port) == 0
