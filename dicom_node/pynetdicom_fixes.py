"""Where pynetdicom (3.0.4) lets a hostile peer hold a connection, and what we do about it.

Each fix is applied once, process-wide, by ``apply()`` before the SCP starts; each is covered by
the fuzz corpus (tests/support/fuzz.py), which found it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pynetdicom.acse
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

log = logging.getLogger(__name__)

# No transfer syntax we (or anyone) support: a context proposing only this is rejected with
# "transfer syntaxes not supported" (0x04), as the standard answer to what it really proposed.
_UNSUPPORTED = "1.2.826.0.1.3680043.10.0.0"


def _negotiate_as_acceptor(rq_contexts: list[PresentationContext],
                           ac_contexts: list[PresentationContext], roles=None):  # noqa: ANN001, ANN202
    """pynetdicom answers each proposed context with its first transfer syntax: a context that
    proposed none (or only values that are no UID, which it drops) raises IndexError in the
    association's thread, which dies with the connection left open, unanswered, for good."""
    for context in rq_contexts:
        if not context.transfer_syntax:
            log.warning("presentation context %s proposes no valid transfer syntax: rejected",
                        context.context_id)
            context.transfer_syntax = [_UNSUPPORTED]
    return negotiate_as_acceptor(rq_contexts, ac_contexts, roles)


_do_action = StateMachine.do_action


def _do_action_or_abort(machine: StateMachine, event: str) -> None:
    """pynetdicom aborts the association when a PDU cannot be decoded, but not when acting on
    a decoded one fails (a PDV shorter than its header, a context ID never accepted, a command
    of no known kind: IndexError or KeyError): the reactor thread dies, the connection stays
    open and keeps one of the association slots, and a few such peers lock everyone out. Do
    what pynetdicom does for a PDU it cannot decode: send an A-ABORT and end the association."""
    try:
        _do_action(machine, event)
    except Exception:  # noqa: BLE001 - any of them would kill the reactor thread
        log.warning("association aborted: pynetdicom could not act on %s in %s", event,
                    machine.current_state, exc_info=True)
        abort(machine.dul)


def abort(dul: DULServiceProvider) -> None:
    """Send an A-ABORT (if the socket still can) and end the association and its DUL thread,
    as pynetdicom does for a PDU it cannot decode."""
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # service provider
    pdu.reason_diagnostic = 0x00  # reason not specified
    try:
        if dul.socket is not None:
            dul.socket.send(pdu.encode())
    except Exception:  # noqa: BLE001 - the peer may be gone already; the end is the same
        log.debug("A-ABORT not sent", exc_info=True)
    dul.assoc.is_aborted = True
    dul.assoc.is_established = False
    dul.assoc._kill = True  # noqa: SLF001 - as pynetdicom's own abort path sets them
    dul._kill_thread = True  # noqa: SLF001


_receive_pdu = DULServiceProvider.receive_pdu


def _receive_pdu_while_alive(dul: DULServiceProvider, wait: bool = False,
                             timeout: float | None = None):  # noqa: ANN202
    """An acceptor waits ACSE-timeout seconds for the A-ASSOCIATE-RQ; when the DUL aborts
    before one arrives (an RQ that cannot be decoded: a non-ASCII AE title, say) nothing ends
    that wait, and the dead association holds its slot for the whole timeout: 16 bad requests
    a half-minute lock everyone out. Wait in short steps and stop once the DUL has ended."""
    if not wait or timeout is None:
        return _receive_pdu(dul, wait, timeout)
    deadline = time.monotonic() + timeout
    while True:
        primitive = _receive_pdu(dul, True, max(min(0.1, deadline - time.monotonic()), 0))
        if primitive is not None or dul._kill_thread or time.monotonic() >= deadline:  # noqa: SLF001
            return primitive


_serve_request = Association._serve_request  # noqa: SLF001


def _serve_request_or_abort(assoc: Association, msg, context_id: int) -> None:  # noqa: ANN001
    """pynetdicom logs a DIMSE message that is no valid request (a response nobody asked for,
    a command field of no known kind) and then waits for more, silent, until the network
    timeout: the sender learns nothing. Abort instead, as for a message on an unknown context.
    A C-STORE whose command names no storage SOP class (not a UID, or one of no storage
    class) pynetdicom aborts too, though the command is readable: answer it with a status."""
    if not assoc._sent_release and not msg.is_valid_request:  # noqa: SLF001
        log.warning("association aborted: a %s where a request was due", msg.msg_type)
        assoc.abort()
        return
    if (isinstance(msg, C_STORE) and context_id in assoc._accepted_cx  # noqa: SLF001
            and not issubclass(uid_to_service_class(msg.AffectedSOPClassUID or ""),
                               StorageServiceClass)):
        _refuse_store(assoc, msg, context_id)
        return
    _serve_request(assoc, msg, context_id)


def _refuse_store(assoc: Association, request: C_STORE, context_id: int) -> None:
    log.warning("C-STORE refused: its command names no storage SOP class (%r)",
                str(request.AffectedSOPClassUID)[:70])
    response = C_STORE()
    response.MessageIDBeingRespondedTo = request.MessageID
    response.Status = 0x0122  # Refused: SOP Class not supported
    assoc.dimse.send_msg(response, context_id)
    received = request._dataset_file  # noqa: SLF001 - pynetdicom's own SCP removes it so
    if received is not None:
        received.close()
        Path(received.name).unlink(missing_ok=True)


def apply() -> None:
    pynetdicom.acse.negotiate_as_acceptor = _negotiate_as_acceptor
    StateMachine.do_action = _do_action_or_abort
    DULServiceProvider.receive_pdu = _receive_pdu_while_alive
    Association._serve_request = _serve_request_or_abort  # noqa: SLF001
