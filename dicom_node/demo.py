"""``spinenode demo``: start the node on the embedded default, send it images, show the results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from dicom_node.admin import list_instances
from dicom_node.config import Settings
from dicom_node.db.session import session_factory
from dicom_node.synthetic import make_radiograph

DEMO_AE = "SPINEDEMO"


def _associate(settings: Settings, contexts: list) -> object:
    ae = AE(ae_title=DEMO_AE)
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)


def _wait_for_echo(settings: Settings, node: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"the node exited with status {node.returncode}")
        assoc = _associate(settings, [Verification])
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        time.sleep(0.5)
    raise RuntimeError("the node did not answer C-ECHO in time")


def run_demo(settings: Settings, count: int = 3, keep_serving: bool = True) -> int:
    env = {**os.environ, **settings.as_environment()}
    node = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve"], env=env,
                            start_new_session=True)
    try:
        _wait_for_echo(settings, node)
        print(f"demo: C-ECHO to {settings.ae_title}@127.0.0.1:{settings.port} succeeded")
        uids = _send_images(settings, count)
        _show_results(settings, uids)
        if keep_serving:
            print(f"demo: the node keeps running; send your own images with e.g.\n"
                  f"  storescu -aec {settings.ae_title} 127.0.0.1 {settings.port} FILE.dcm\n"
                  "and list them with '.venv/bin/spinenode instances'. Ctrl-C stops it.",
                  flush=True)
            signal.signal(signal.SIGTERM, lambda *_: node.send_signal(signal.SIGTERM))
            try:
                node.wait()
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        if node.poll() is None:
            node.terminate()
            node.wait(60)


def _send_images(settings: Settings, count: int) -> list[str]:
    assoc = _associate(settings, [DigitalXRayImageStorageForPresentation])
    if not assoc.is_established:
        raise RuntimeError("the node refused the demo's association")
    uids = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(count):
            path = make_radiograph(Path(folder) / f"{index}.dcm", rows=1024, columns=820,
                                   seed=index)
            ds = dcmread(path)
            status = assoc.send_c_store(ds)
            print(f"demo: C-STORE {ds.SOPInstanceUID} ({ds.Columns}x{ds.Rows} DX, "
                  f"{path.stat().st_size // 1024} KiB) -> status 0x{status.Status:04X}")
            uids.append(str(ds.SOPInstanceUID))
    assoc.release()
    return uids


def _show_results(settings: Settings, uids: list[str], timeout: float = 120) -> None:
    sessions = session_factory(settings.effective_database_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in list_instances(sessions, limit=1000) if r["sop_instance_uid"] in uids]
        if len(rows) == len(uids) and all(r["status"] in ("done", "failed", "skipped")
                                          for r in rows):
            break
        time.sleep(0.5)
    print(f"demo: results in {settings.effective_database_url}")
    for row in sorted(rows, key=lambda r: r["id"]):
        decoded = (f"decoded {row['columns']}x{row['rows']} {row['photometric_interpretation']} "
                   f"in {row['decode_seconds']:.3f} s" if row["decode_seconds"] else "")
        print(f"  {row['sop_instance_uid']}: {row['status']} {decoded}{row['last_error']}")
