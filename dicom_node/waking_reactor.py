"""An association's two threads wait for work instead of polling for it.

pynetdicom (3.0.4) runs two threads per association, and both poll: the reactor wakes every
millisecond to look for a complete DIMSE message, a release or an abort, and the DUL thread,
whenever it finds nothing to do, sleeps a millisecond and looks at the socket again. Each
wake-up takes the GIL: four open, idle associations cost the node a fifth of a core (measured),
and an association whose sender is slower than we are (most networks) costs the same while it
lasts. ``install()`` has each thread sleep until it has something to do:

- the reactor, until the DUL thread hands it a message, a release or an abort, a requestor
  pauses it to send, the association is killed or its DUL thread ends;
- the DUL thread, until the peer's socket has data, another thread gives it something to send
  or an event, or kills it (it waits on the socket and on a doorbell, a socket pair those
  threads ring).

Either also wakes after ``_FALLBACK_SECONDS``: that keeps the checks that only time triggers
(the network timeout, the ARTIM timer) and bounds the wait for any wake-up we did not foresee.

Both the wait and the DUL thread's look at its socket use poll(), not select(): select fails on
descriptors numbered 1024 and up, and pynetdicom took that failure for a closed connection, so
a process with a thousand files open refused every association.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from dicom_node.pynetdicom_fixes import abort

# Where pynetdicom logs the same lines.
log = logging.getLogger("pynetdicom.association")
dul_log = logging.getLogger("pynetdicom.dul")

_FALLBACK_SECONDS = 0.05


class _WakingQueue(queue.Queue):
    """A queue whose every put wakes the thread that takes from it."""

    def __init__(self, wake: Callable[[], object], items: queue.Queue) -> None:
        super().__init__()
        self._wake = wake
        self.queue.extend(items.queue)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _WakingCheckpoint(threading.Event):
    """The event that pauses the reactor: clearing it (a pause request) wakes the reactor, which
    then reaches the pause at once, as the requestor's send waits for it to."""

    def __init__(self, wake: Callable[[], object]) -> None:
        super().__init__()
        self._wake = wake
        self.set()  # not paused, as pynetdicom starts it

    def clear(self) -> None:
        super().clear()
        self._wake()


class _Doorbell:
    """A socket pair the DUL thread waits on beside the peer's socket, from its start to its
    end; other threads ring it."""

    def __init__(self, dul: DULServiceProvider) -> None:
        self._dul = dul
        self._bell, self._ringer = socket.socketpair()
        self._bell.setblocking(False)
        self._ringer.setblocking(False)
        # Ringing and closing exclude each other: a byte sent on a descriptor just closed could
        # land in whatever connection reuses its number.
        self._lock = threading.Lock()
        self._closed = False

    def ring(self) -> None:
        if threading.current_thread() is self._dul:
            return  # the DUL thread looks at its queues before it waits again
        with self._lock:
            if self._closed:
                return
            try:
                self._ringer.send(b"\0")
            except OSError:  # full: it will wake anyway
                pass

    def wait(self, peer: socket.socket) -> None:
        """Until the peer's socket or the bell can be read, or the fallback passes. poll, not
        select: select fails on descriptors numbered 1024 and up, which a busy node has."""
        poller = select.poll()
        poller.register(self._bell, select.POLLIN)
        try:
            poller.register(peer, select.POLLIN)
        except (OSError, ValueError):  # closed meanwhile: the loop finds out, a moment later
            time.sleep(self._dul._run_loop_delay)
            return
        poller.poll(_FALLBACK_SECONDS * 1000)
        try:
            while self._bell.recv(4096):
                pass
        except OSError:  # nothing (more) to read
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._bell.close()
            self._ringer.close()


_init = Association.__init__
_kill = Association.kill
_kill_dul = DULServiceProvider.kill_dul


def _init_waking(assoc: Association, *args: Any, **kwargs: Any) -> None:
    _init(assoc, *args, **kwargs)
    assoc._wake = threading.Event()
    dul = assoc.dul
    dul._doorbell = None  # from the DUL thread's start to its end
    # The queues are still empty: the DUL thread has not started.
    dul.to_user_queue = _WakingQueue(assoc._wake.set, dul.to_user_queue)
    assoc.dimse.msg_queue = _WakingQueue(assoc._wake.set, assoc.dimse.msg_queue)
    assoc._reactor_checkpoint = _WakingCheckpoint(assoc._wake.set)
    dul.to_provider_queue = _WakingQueue(lambda: _ring(dul), dul.to_provider_queue)
    dul.event_queue = _WakingQueue(lambda: _ring(dul), dul.event_queue)


def _ring(dul: DULServiceProvider) -> None:
    doorbell = dul._doorbell
    if doorbell is not None:  # else the DUL thread looks at its queues when it starts
        doorbell.ring()


def _kill_waking(assoc: Association) -> None:
    _kill(assoc)
    assoc._wake.set()  # after: the reactor looks at the flag that kill() sets


def _kill_dul_waking(dul: DULServiceProvider) -> None:
    _kill_dul(dul)
    _ring(dul)


def _run_reactor(assoc: Association) -> None:  # noqa: C901 - pynetdicom's, step for step
    """pynetdicom 3.0.4's ``Association._run_reactor`` with its 1-ms sleep replaced by waiting
    to be woken."""
    assoc._is_paused = False
    while not assoc._kill:
        assoc._wake.wait(_FALLBACK_SECONDS)
        assoc._wake.clear()  # before the checks: what is put during them wakes the next wait
        # Paused while a requestor sends on this association (pynetdicom's send_* methods).
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        if not assoc._reactor_checkpoint.is_set():
            # Paused again before _is_paused went False, a send that saw it True goes ahead:
            # taking a message now could take its reply (pynetdicom's race, seen 2 in 4,000).
            continue

        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, context_id)
            assoc._wake.set()  # one put before the clear above may be waiting still

        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            log.info("Association Released")
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return

        if assoc.acse.is_aborted():
            message = "Association Aborted"
            if assoc.acse.is_aborted("a-p-abort"):
                message += " (A-P-ABORT)"
            log.info(message)
            assoc.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return

        if not assoc.dul.is_alive():
            assoc.kill()
            return

        if assoc.dul.idle_timer_expired():
            log.error("Network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return


def _run_dul(dul: DULServiceProvider) -> None:
    """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor`` with its 1-ms sleep replaced by
    waiting for work; the reactor is woken when it ends."""
    try:
        dul._doorbell = _Doorbell(dul)
    except OSError as error:  # out of descriptors, say: the association still works, polling
        dul_log.warning("this association's DUL thread polls: no socket pair to wait on (%s)",
                        error)
    try:
        _run_dul_loop(dul)
    finally:
        doorbell, dul._doorbell = dul._doorbell, None
        if doorbell is not None:
            doorbell.close()
        dul.assoc._wake.set()  # the reactor sees the DUL thread has ended


def _run_dul_loop(dul: DULServiceProvider) -> None:
    dul._idle_timer.start()
    idle = False
    while True:
        if not dul.assoc._dul_ready.is_set():
            dul.assoc._dul_ready.set()  # lets the reactor start
            idle = True
        if idle:  # nothing was done last time round
            _wait_for_work(dul)
        if dul._kill_thread:
            break
        # The ARTIM timer first, so that its event is queued ahead of any other.
        if dul.artim_timer.expired:
            dul.event_queue.put("Evt18")
        try:
            # Either send one primitive or receive one PDU a loop.
            if dul._process_recv_primitive():
                pass
            elif dul._is_transport_event():
                dul._idle_timer.restart()
        except Exception:
            dul_log.exception("Exception in DUL.run(), aborting association")
            abort(dul)  # bypasses the state machine, which the exception may have left broken
            return
        try:
            event = dul.event_queue.get(block=False)
        except queue.Empty:
            idle = True
            continue
        dul.state_machine.do_action(event)
        idle = False


def _wait_for_work(dul: DULServiceProvider) -> None:
    """Until the peer's socket has data, another thread rings, or the fallback passes. With no
    connection (Sta1: before one or after it) pynetdicom's own 1-ms sleep: there the thread
    only waits for ``stop_dul``, which sets its flag and waits without ringing. With no
    doorbell the same sleep."""
    peer = dul.socket.socket if dul.socket is not None else None
    if peer is None or dul._doorbell is None or dul.state_machine.current_state == "Sta1":
        time.sleep(dul._run_loop_delay)
        return
    if isinstance(peer, ssl.SSLSocket) and peer.pending():
        return  # decrypted data already buffered, which select does not see
    dul._doorbell.wait(peer)


def _ready(sock: AssociationSocket) -> bool:
    """pynetdicom 3.0.4's ``AssociationSocket.ready`` (is there data to read?) with poll."""
    if sock.socket is None or sock._is_connected is False:
        return False
    try:
        poller = select.poll()
        poller.register(sock.socket, select.POLLIN)
        ready = bool(poller.poll(0))
    except (OSError, ValueError):
        sock.event_queue.put("Evt17")  # transport connection closed
        return False
    # An SSLSocket may hold decrypted data that poll does not see.
    return ready or (isinstance(sock.socket, ssl.SSLSocket) and bool(sock.socket.pending()))


def install() -> None:
    """Process-wide; installing it again changes nothing."""
    Association.__init__ = _init_waking
    Association.kill = _kill_waking
    Association._run_reactor = _run_reactor
    DULServiceProvider.kill_dul = _kill_dul_waking
    DULServiceProvider.run_reactor = _run_dul
    AssociationSocket.ready = property(_ready)
