"""Readiness says each thing that keeps a node from taking and analysing images, one check at a
time, on PostgreSQL; and a node run with ``SPINENODE_HTTP_PORT=0`` serves DICOM with no HTTP
port at all."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil

from dicom_node.db import migrate
from tests.support.node import SPINENODE, NodeProcess, free_port, wait_for
from tests.support.web import Http


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports a process and its children listen on."""
    root = psutil.Process(pid)
    return {c.laddr.port for p in [root, *root.children(recursive=True)]
            for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def test_readiness_names_what_is_missing(tmp_path: Path, postgres_url: str) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")  # configured; no worker will ever serve it
    migrate.upgrade(postgres_url)
    port = free_port()
    env = {**os.environ, "SPINENODE_DATA_DIR": str(tmp_path / "var"),
           "SPINENODE_DATABASE_URL": postgres_url, "SPINENODE_HTTP_PORT": str(port),
           "SPINENODE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",  # nobody listens
           "SPINENODE_MIN_FREE_DISK_MB": str(2**40),  # more than any disk has
           "SPINENODE_BUNDLE": str(bundle)}
    web = subprocess.Popen([*SPINENODE, "web"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        http = Http(port)
        wait_for(lambda: http.live() or web.poll() is not None, 60,
                 what="spinenode web to listen")
        assert web.poll() is None
        status, ready = http.get("/health/ready")
        assert status == 503 and ready["ready"] is False
        checks = ready["checks"]
        assert checks["database"]["ok"] and "schema at 0007" in checks["database"]["detail"]
        assert not checks["broker"]["ok"]
        assert checks["spool"] == {"ok": False,
                                   "detail": f"no spool at {tmp_path / 'var' / 'spool'}"}
        assert not checks["worker"]["ok"]
        assert checks["bundle"] == {"ok": False, "detail": f"no live worker serves {bundle}"}
        assert http.get("/health/live") == (200, {"live": True})  # up, though not ready

        # The node's data dir appears, on a disk with less free space than the minimum.
        (tmp_path / "var" / "spool").mkdir(parents=True)
        status, ready = http.get("/health/ready")
        assert not ready["checks"]["spool"]["ok"]
        assert f"MB free (minimum {2**40} MB)" in ready["checks"]["spool"]["detail"]

        # The schema taken back under the running page: the database check says what to run.
        migrate.downgrade(postgres_url, "0006")
        status, ready = http.get("/health/ready")
        assert status == 503 and ready["checks"]["database"] == {
            "ok": False, "detail": "schema at 0006, needs 0007: run spinenode db upgrade"}
    finally:
        web.terminate()
        web.wait(30)


def test_http_port_0_serves_dicom_without_http(tmp_path: Path, postgres_url: str) -> None:
    node = NodeProcess(tmp_path / "var", postgres_url, env={"SPINENODE_HTTP_PORT": "0"}).start()
    try:
        # The start-up line comes once everything that would listen does.
        wait_for(lambda: "no HTTP (http_port 0)" in node.log(), 30, what="the start-up line")
        assert node.process is not None
        assert _listening_ports(node.process.pid) == {node.port}
    finally:
        node.stop()
    alone = subprocess.run([*SPINENODE, "web"], env=node.env, capture_output=True, text=True,
                           timeout=60)
    assert alone.returncode != 0 and "SPINENODE_HTTP_PORT is 0: nothing to serve" in alone.stderr
