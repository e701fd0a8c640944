"""The node under test as real processes, and what tests ask of it: `spinenode serve` (or
`worker`) as a subprocess with its own data dir and port, DCMTK storescu as the modality, the
instances table, and waiting for a condition."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicom_node.admin import show
from dicom_node.cli.common import free_port
from dicom_node.db import migrate
from dicom_node.db.models import Instance
from dicom_node.db.session import session_factory
from dicom_node.outbox import list_deliveries

POSTGRES_ADMIN_URL = os.environ.get("SPINENODE_TEST_POSTGRES",
                                    "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST_URL = os.environ.get("SPINENODE_TEST_REDIS", "redis://127.0.0.1:6379")
SPINENODE = [sys.executable, "-m", "dicom_node.cli"]
# Where a routed image ends when no model bundle is configured: decoded, waiting for a model.
DECODED = "waiting-for-model"


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2,
             what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def files_outside(root: Path, *allowed: Path) -> set[Path]:
    """Files under ROOT that are in none of the ALLOWED folders."""
    return {p for p in root.rglob("*")
            if p.is_file() and not any(p.is_relative_to(folder) for folder in allowed)}


def echo(port: int, ae_title: str = "SPINENODE") -> int | None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if "Status" in status else None


class NodeProcess:
    """``spinenode serve`` (or ``worker``) as a subprocess with its own data dir and port."""

    def __init__(self, data_dir: Path, database_url: str, *, broker_url: str = "embedded",
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 command: str = "serve", port: int | None = None):
        self.data_dir = data_dir
        self.database_url = database_url
        self.port = port or free_port()
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "SPINENODE_DATA_DIR": str(data_dir),
            "SPINENODE_PORT": str(self.port),
            "SPINENODE_HTTP_PORT": str(self.http_port),
            "SPINENODE_DATABASE_URL": database_url,
            "SPINENODE_BROKER_URL": broker_url,
            "SPINENODE_RECONCILE_INTERVAL_SECONDS": "2",
            "SPINENODE_RECONCILE_GRACE_SECONDS": "3",
            "SPINENODE_STUDY_STABLE_SECONDS": "2",  # study reports soon after the last image
            **(env or {}),
        }
        self.command = command
        self.args = args
        self.log_path = data_dir / f"{command}-{uuid.uuid4().hex[:6]}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # As the compose file's one-shot migration does before the node starts; in this
        # process: a `spinenode db upgrade` process cost 1.6 CPU-s, at some 60 node starts a
        # run (the command itself is tested in test_startup_checks and test_bundle).
        migrate.upgrade(self.env["SPINENODE_DATABASE_URL"])
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [*SPINENODE, self.command, *self.args], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        if self.command == "serve" and self.env.get("SPINENODE_TLS_ONLY") == "true":
            # No plain port to C-ECHO: its start-up line says it listens.
            wait_for(lambda: self._alive() and "spinenode: SPINENODE listening" in self.log(),
                     60, what=f"spinenode serve to listen (log: {self.log()})")
        elif self.command == "serve":
            wait_for(lambda: self._alive() and echo(self.port) == 0, 60,
                     what=f"spinenode serve to answer C-ECHO (log: {self.log()})")
        if self.command == "serve" and self.env["SPINENODE_HTTP_PORT"] != "0":
            # The page and API start after the DICOM port: a test may ask them at once.
            wait_for(lambda: self._alive() and listens(self.http_port), 60,
                     what=f"spinenode serve's HTTP port (log: {self.log()})")
        return self

    def _alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"spinenode {self.command} exited:\n{self.log()}")
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group: a power cut for this process and its children."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def listens(port: int) -> bool:
    """Whether something on this machine accepts TCP connections on ``port``."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def storescu(port: int, files: list[Path], *options: str,
             called_ae: str = "SPINENODE") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", called_ae, *options, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def deliveries(database_url: str) -> list[dict]:
    """The node's deliveries as `spinenode deliveries --json` lists them (newest first), read in
    this process: tests poll them, and a process for the command cost 2 CPU-s a poll."""
    return list_deliveries(session_factory(database_url))


def shown(database_url: str, uid: str | None = None,
          accession: str | None = None) -> dict | None:
    """A study as `spinenode show --json` prints it, read in this process (as ``deliveries``)."""
    return show(session_factory(database_url), uid=uid, accession=accession)


def instances(database_url: str) -> list[Instance]:
    with session_factory(database_url)() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def wait_until_settled(database_url: str, count: int, timeout: float = 90) -> list[Instance]:
    """Wait until ``count`` instances exist and none is still on its way."""
    def settled() -> list[Instance] | None:
        rows = instances(database_url)
        busy = [r for r in rows if r.status in ("received", "queued", "processing")]
        return rows if len(rows) >= count and not busy else None

    return wait_for(settled, timeout, what=f"{count} instances to settle")  # type: ignore[return-value]
