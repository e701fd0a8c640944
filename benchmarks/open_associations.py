"""What open associations cost while no data arrives: CPU of `spinenode serve` against a bare
pynetdicom storage SCP (its own threads, which poll every millisecond), same run.

An association whose sender is slower than the node (most networks) or that a PACS holds open
between studies spends most of its life waiting. N associations are opened to each server in
turn and held for --seconds; the figure is the server's CPU-seconds per second meanwhile.

    .venv/bin/python benchmarks/open_associations.py [--associations 1 4 16] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from pynetdicom import AE
from pynetdicom.sop_class import Verification

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.intake import stop, wait_for_port  # noqa: E402
from benchmarks.machine import cpu  # noqa: E402
from dicom_node.cli.common import free_port  # noqa: E402

# The reference: pynetdicom's storage SCP as its documentation starts one, nothing of ours.
BARE_SCP = """
import sys
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
ae = AE(ae_title="SPINENODE")
ae.supported_contexts = AllStoragePresentationContexts
ae.add_supported_context(Verification)
ae.maximum_associations = 64
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True)
"""


def start_bare(port: int, work: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BARE_SCP, str(port)], cwd=work,
                            start_new_session=True)


def start_node(port: int, work: Path) -> subprocess.Popen:
    env = {**os.environ, "SPINENODE_DATA_DIR": str(work / "node"), "SPINENODE_PORT": str(port),
           "SPINENODE_HTTP_PORT": "0", "SPINENODE_LOG_LEVEL": "WARNING",
           "SPINENODE_MAX_ASSOCIATIONS": "64"}
    cli = [sys.executable, "-m", "dicom_node.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True, cwd=ROOT)
    return subprocess.Popen([*cli, "serve", "--no-worker"], env=env, cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL)


def cpu_per_second(start, count: int, seconds: float, work: Path) -> float:  # noqa: ANN001
    """The server's CPU-seconds per second while ``count`` associations to it stay open."""
    port = free_port()
    server = start(port, work)
    associations = []
    try:
        wait_for_port(port)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        for _ in range(count):
            association = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
            if not association.is_established:
                raise RuntimeError("the server refused an association")
            associations.append(association)
        process = psutil.Process(server.pid)
        time.sleep(1)  # past the start of every association's threads
        before = sum(process.cpu_times()[:2])
        time.sleep(seconds)
        return (sum(process.cpu_times()[:2]) - before) / seconds
    finally:
        for association in associations:
            association.abort()
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    print(f"CPU: {cpu()}")
    print("open associations, no data: server CPU-seconds per second")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for count in args.associations:
            bare = cpu_per_second(start_bare, count, args.seconds, work)
            ours = cpu_per_second(start_node, count, args.seconds, work)
            print(f"{count:3d} open: pynetdicom's own SCP {bare:.3f}, spinenode {ours:.3f} "
                  f"({ours / bare:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
