"""Receiving a C-STORE's data set faster than pynetdicom (3.0.4) does on its own.

pynetdicom reads a PDU from the socket in 4 KiB pieces and, with ``STORE_RECV_CHUNKED_DATASET``,
writes the data set fragment by fragment into a ``NamedTemporaryFile``, flushing after each; the
intake then read every file back whole to hash it. ``install()`` changes two things:

- the socket is read in pieces of up to ``_READ_BYTES`` (what has arrived, in one call);
- pynetdicom's temporary file is our ``HashingFile``: the same file, written unbuffered, whose
  SHA-256 a thread of its own computes from the same fragments while the next ones arrive
  (hashlib lets go of the GIL), so the digest is ready when the last fragment is written.
  ``finish(path)`` gives it to the store handler. The same thread asks Linux to start writing
  each ``_WRITEBACK_BYTES`` to disk as they are written (``sync_file_range``, which does not
  wait): the fsync before 0x0000 then finds little left to write (measured: 10 MB, 6.5 ms ->
  0.8 ms). Once per 2 MiB, not once per fragment: a call per 128 KiB fragment held intake back
  (`benchmarks/intake.py`, 2-core AMD EPYC of family 26, two runs each in turn: one sender 374
  and 380 -> 417 and 444 MB/s, four senders 369 and 364 -> 457 and 426 MB/s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import queue
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pynetdicom.dimse_messages
from pynetdicom.transport import AssociationSocket

_READ_BYTES = 1 << 18
_WRITEBACK_BYTES = 1 << 21  # 8 MiB measured no better
_QUEUED_CHUNKS = 64  # fragments written but not yet hashed: up to 8 MiB at 128 KiB PDUs


def _writeback_starter() -> Callable[[int, int, int], object]:
    """(fd, offset, length) -> start writing that range to disk, without waiting; nothing
    where the C library has no sync_file_range (not Linux)."""
    try:
        call = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return lambda fd, offset, length: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    write_only = 2  # SYNC_FILE_RANGE_WRITE
    return lambda fd, offset, length: call(fd, offset, length, write_only)


_start_writeback = _writeback_starter()
_open: dict[str, HashingFile] = {}  # by path, until pynetdicom closes it after the handler
_lock = threading.Lock()


class HashingFile:
    """What pynetdicom uses of a ``NamedTemporaryFile``: ``name``, ``write``, ``file.flush``,
    ``close``."""

    def __init__(self, *, delete: bool = False, mode: str = "wb", suffix: str = "") -> None:
        self._file = tempfile.NamedTemporaryFile(delete=delete, mode=mode, suffix=suffix,
                                                 buffering=0)
        self._raw = self._file.file
        self._digest = hashlib.sha256()
        self._written = 0
        # Bounded: a hasher slower than the network holds up the writes, not more memory.
        self._chunks: queue.Queue[tuple[int, bytes] | None] = queue.Queue(_QUEUED_CHUNKS)
        self._hasher = threading.Thread(target=self._hash, name="sha256", daemon=True)
        self._hasher.start()
        self.name = self._file.name
        self.file = self  # pynetdicom calls data_set_file.file.flush() after each fragment
        with _lock:
            _open[self.name] = self

    def _hash(self) -> None:
        started = 0  # bytes whose writeback has been started
        while (item := self._chunks.get()) is not None:
            offset, chunk = item
            self._digest.update(chunk)
            end = offset + len(chunk)
            if end - started >= _WRITEBACK_BYTES:
                _start_writeback(self._raw.fileno(), started, end - started)
                started = end

    def write(self, data: bytes) -> int:
        data = bytes(data)  # immutable: the hasher reads it later
        view = memoryview(data)
        while view:  # an unbuffered write may take less than it was given
            view = view[self._raw.write(view):]
        self._chunks.put((self._written, data))
        self._written += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing to do: every write went to the file at once."""

    def finish(self) -> str:
        """The SHA-256 of everything written, once the hasher has caught up."""
        self._chunks.put(None)
        self._hasher.join()
        return self._digest.hexdigest()

    def close(self) -> None:
        with _lock:
            _open.pop(self.name, None)
        self._chunks.put(None)  # a hasher not finished (the association ended early) stops
        self._hasher.join()  # before the file (and its descriptor) goes
        self._file.close()


def _recv(sock: AssociationSocket, nr_bytes: int) -> bytearray:
    """pynetdicom's ``AssociationSocket.recv`` reading what has arrived, up to _READ_BYTES a
    call, instead of 4 KiB; as there, memory grows only with the data that arrives, and a
    broken connection returns what was read."""
    received = bytearray()
    while len(received) < nr_bytes:
        data = sock.socket.recv(min(nr_bytes - len(received), _READ_BYTES))
        if not data:
            break
        received += data
    return received


def install() -> None:
    """Process-wide, like the rest of pynetdicom's receive settings."""
    AssociationSocket.recv = _recv
    pynetdicom.dimse_messages.NamedTemporaryFile = HashingFile


def finish(path: str | Path) -> str | None:
    """The SHA-256 of a received file; None for one that was not received through
    ``HashingFile``."""
    with _lock:
        received = _open.get(str(path))
    return received.finish() if received is not None else None
