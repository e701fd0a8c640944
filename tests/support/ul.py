"""A DICOM Upper Layer client that sends bytes exactly as it is given them (PS3.8 9.3), for the
fuzz corpus: pynetdicom's own client would refuse to encode most of what we want to send.

One association per conversation: A-ASSOCIATE-RQ with one presentation context (ID 1), then the
caller's bytes as they are, then whatever the node answers, read as one of a few outcomes.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLICIT_LITTLE = "1.2.840.10008.1.2"

# Message control header of a PDV (PS3.8 E.2): bit 0 command, bit 1 last fragment.
DATASET, COMMAND, LAST = 0x00, 0x01, 0x02


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _ae(title: str) -> bytes:
    return title.encode("latin-1").ljust(16)[:16]  # latin-1: a test may send what is no ASCII


def associate_rq(abstract_syntax: str, transfer_syntaxes: list[str], calling: str = "FUZZER",
                 called: str = "SPINENODE", max_pdu: int = 16384) -> bytes:
    context = bytes([1, 0, 0, 0]) + _item(0x30, abstract_syntax.encode()) + b"".join(
        _item(0x40, syntax.encode()) for syntax in transfer_syntaxes)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.10.1")
    body = (struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT) + _item(0x20, context) + _item(0x50, user))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(*pdvs: tuple[int, bytes], context_id: int = 1) -> bytes:
    """One P-DATA-TF PDU holding each (message control header, fragment) as a PDV item."""
    items = b"".join(struct.pack(">IBB", len(data) + 2, context_id, control) + data
                     for control, data in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(items)) + items


def command_set(**attributes: object) -> bytes:
    """A DIMSE command set (always implicit VR little endian) with its group length first."""
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    body = buffer.getvalue()
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command_set(AffectedSOPClassUID=sop_class, CommandField=0x0001,
                       MessageID=message_id, Priority=0, CommandDataSetType=0x0000,
                       AffectedSOPInstanceUID=sop_instance)


def c_store(sop_class: str, sop_instance: str, dataset: bytes, max_pdv: int = 16000) -> bytes:
    """A well-framed C-STORE-RQ: its command in one PDV, the data set in as many as it takes."""
    pdus = [p_data((COMMAND | LAST, c_store_rq(sop_class, sop_instance)))]
    chunks = [dataset[at:at + max_pdv] for at in range(0, len(dataset), max_pdv)] or [b""]
    for index, chunk in enumerate(chunks):
        pdus.append(p_data((DATASET | (LAST if index == len(chunks) - 1 else 0), chunk)))
    return b"".join(pdus)


RELEASE_RQ = struct.pack(">BBIi", 0x05, 0, 4, 0)


@dataclass(frozen=True)
class Reply:
    """What the node did with one conversation.

    kind: ``status`` (a C-STORE/C-ECHO response came, ``status`` holds it), ``abort`` (A-ABORT),
    ``rejected`` (A-ASSOCIATE-RJ), ``closed`` (the connection ended without a PDU, after we had
    ended ours), ``silent`` (no answer within the time given: the node is holding the
    association).
    """

    kind: str
    status: int | None = None
    seconds: float = 0.0


class _Connection:
    def __init__(self, port: int, timeout: float):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def read_pdu(self, timeout: float) -> tuple[int, bytes] | None:
        """The next PDU (type, body); None when the peer closed. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buffer) >= 6:
                kind, length = self.buffer[0], struct.unpack(">I", self.buffer[2:6])[0]
                if len(self.buffer) >= 6 + length:
                    body, self.buffer = self.buffer[6:6 + length], self.buffer[6 + length:]
                    return kind, body
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def _status_of(body: bytes) -> int | None:
    """The Status (0000,0900) of a command set carried in a P-DATA-TF body's first PDV."""
    if len(body) < 6 or not body[5] & COMMAND:
        return None
    command = body[6:4 + struct.unpack(">I", body[:4])[0]]
    at = 0
    while at + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, at)
        if (group, element) == (0x0000, 0x0900) and length == 2:
            return struct.unpack_from("<H", command, at + 8)[0]
        at += 8 + length
    return None


def converse(port: int, association: bytes, payload: bytes, *, answer_within: float = 30.0,
             complete: bool = True) -> Reply:
    """Associate with ASSOCIATION (an A-ASSOCIATE-RQ, possibly malformed), send PAYLOAD as it is,
    and read the node's answer. Bytes that are not COMPLETE (they promise more than they hold)
    get a second to be answered, then our side of the connection is shut, as a peer that went
    away would: the node must notice."""
    start = time.monotonic()
    connection = _Connection(port, answer_within)

    def done(kind: str, status: int | None = None) -> Reply:
        return Reply(kind, status, time.monotonic() - start)

    def next_pdu(patient: bool) -> tuple[int, bytes] | None:
        """The node's next PDU; if not PATIENT, shut our side after a second of silence."""
        try:
            return connection.read_pdu(answer_within if patient else 1.0)
        except TimeoutError:
            if patient:
                raise
        connection.sock.shutdown(socket.SHUT_WR)
        return connection.read_pdu(answer_within)

    try:
        connection.sock.sendall(association)
        reply = next_pdu(complete or bool(payload))
        if reply is None or reply[0] in (0x03, 0x07):
            return done({None: "closed", 0x03: "rejected", 0x07: "abort"}[reply and reply[0]])
        try:
            connection.sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node stopped reading: its answer (or its close) is below
        while True:
            reply = next_pdu(complete)
            if reply is None:
                return done("closed")
            kind, body = reply
            if kind == 0x07:
                return done("abort")
            if kind == 0x04 and (status := _status_of(body)) is not None:
                try:
                    connection.sock.sendall(RELEASE_RQ)
                    connection.read_pdu(5.0)  # A-RELEASE-RP; a node that aborts instead is fine
                except (OSError, TimeoutError):
                    pass
                return done("status", status)
    except TimeoutError:
        return done("silent")
    except (ConnectionResetError, BrokenPipeError):
        return done("closed")
    finally:
        connection.close()
