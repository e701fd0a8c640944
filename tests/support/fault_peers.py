"""Real services a fault test owns, so it can kill and restart them: Redis and PostgreSQL on
free ports, DCMTK storescp as the PACS, and a modality that streams images at a steady rate;
a port that drops every connection, as a firewall does, a forwarded port whose traffic can be
cut as a network is cut, and an HTTP server that answers every POST late or with an error.

Nothing here touches the machine's own PostgreSQL or Redis, except CuttableLink: it forwards to
them, and cuts its own port with the machine's firewall (one port, removed after).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from dicom_node.cli.common import free_port
from tests.support.node import listens, wait_for


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root; CI runs as root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _postgres_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if not versions:
        raise RuntimeError("PostgreSQL server binaries not found (Debian: postgresql)")
    return str(versions[0] / name)


class OwnPostgres:
    """A PostgreSQL cluster of the test's own (trust auth, no fsync: speed, not durability)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="spinenode-pg-"))
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run([*_as_postgres_user(), _postgres_bin("initdb"), "-D", str(self.dir / "data"),
                        "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _ctl(self, *args: str) -> None:
        subprocess.run([*_as_postgres_user(), _postgres_bin("pg_ctl"), "-D",
                        str(self.dir / "data"), *args], check=True, capture_output=True,
                       timeout=60)

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
                   "-c max_connections=200")
        self._ctl("-w", "-o", options, "-l", str(self.dir / "log"), "start")

    def stop_immediately(self) -> None:
        """As a crash: no shutdown checkpoint, every connection cut."""
        self._ctl("-m", "immediate", "stop")

    def close(self) -> None:
        try:
            self._ctl("-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


class OwnRedis:
    """redis-server on a free port, keeping nothing on disk (as the machine's own)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"],
                                        capture_output=True, text=True).stdout.strip() == "PONG",
                 10, what="redis-server")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


class Pacs:
    """DCMTK storescp; each object it receives is a file of its own (+uf), so a second copy of
    the same object shows as a second file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def destination(self) -> str:
        return f"PACS@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["storescp", "+xa", "+uf", "-aet", "PACS", "-od", str(self.folder), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Listening before start() returns: a send right after it must find the peer up.
        wait_for(lambda: listens(self.port), 20, interval=0.05, what="storescp to listen")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def received(self) -> Counter:
        """How often each SOP Instance UID arrived."""
        return Counter(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                       for path in self.folder.iterdir() if path.is_file())


@dataclass
class Sent:
    path: Path
    uid: str
    status: int | None  # None: no answer (node down, association aborted)


@dataclass
class Modality:
    """Sends images one association each, one every ``interval`` seconds, from a thread."""

    files: list[Path]
    port: int
    interval: float
    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Modality:
        self._thread.start()
        return self

    def join(self, timeout: float = 300) -> list[Sent]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "modality still sending"
        return self.sent

    def _run(self) -> None:
        for path in self.files:
            started = time.monotonic()
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            self.sent.append(Sent(path, uid, send(path, self.port)))
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))


def send(path: Path, port: int) -> int | None:
    """One C-STORE on its own association: the status, or None without an answer."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
    except Exception:
        return None
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(dcmread(path))
    except Exception:
        status = None
    finally:
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if status is not None and "Status" in status else None


@contextmanager
def dropping_connections() -> Iterator[int]:
    """A port whose listening socket has a full backlog: new connections are dropped, as a
    firewall drops them, and the kernel would retry for over 2 minutes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # fills the backlog
    try:
        yield port
    finally:
        queued.close()
        listener.close()


class CuttableLink:
    """A port on 127.0.0.1 forwarded to ``target`` until ``cut()``: from then on the kernel
    drops every packet to and from it (iptables on lo, that port only; root), so neither end
    hears anything, not even a reset, as when a network is cut. A user-space proxy that went
    quiet could not do it: its kernel would still acknowledge the data."""

    def __init__(self, target: tuple[str, int]):
        if os.geteuid() != 0 or shutil.which("iptables") is None:
            pytest.skip("cutting a connection takes iptables and root")
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._rules: list[list[str]] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
                far = socket.create_connection(self.target)
            except OSError:
                return
            self._sockets += [near, far]
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        for direction in ("--dport", "--sport"):
            rule = ["INPUT", "-i", "lo", "-p", "tcp", direction, str(self.port), "-m",
                    "comment", "--comment", "spinenode test: CuttableLink", "-j", "DROP"]
            _iptables("-I", rule)
            with self._lock:
                self._rules.append(rule)

    def mend(self) -> None:
        with self._lock:
            rules, self._rules = self._rules, []
        for rule in rules:  # each on its own: one that fails leaves the others removed
            _iptables("-D", rule, check=False)

    def close(self) -> None:
        self.mend()
        for sock in [self._listener, *self._sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it
            except OSError:
                pass
            sock.close()


def _iptables(action: str, rule: list[str], check: bool = True) -> None:
    result = subprocess.run(["iptables", "-w", action, *rule], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"iptables {action} {' '.join(rule)}: {result.stderr.strip()}")


@contextmanager
def http_answering(status: int, after: float = 0.0) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 that reads each POST and answers ``status`` (no body)
    ``after`` seconds later: its base URL, and the paths it was asked for, in order."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            asked.append(self.path)
            time.sleep(after)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", asked
    finally:
        server.shutdown()
        server.server_close()
