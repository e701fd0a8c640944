"""DCMTK's command-line tools first on PATH.

pynetdicom 3 installs console scripts with DCMTK's names (storescp, storescu, echoscu, ...) into
the virtual environment; with the environment activated they would answer instead of DCMTK, whose
options they do not take. The tests and benchmarks speak to DCMTK, the reference peer.
"""

from __future__ import annotations

import os
from pathlib import Path


def put_dcmtk_first_on_path() -> None:
    """Move the first folder holding DCMTK's storescu (a program, where pynetdicom's is a
    Python script) to the front of PATH; nothing changes when DCMTK is not installed."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    for folder in folders:
        if folder and _is_program(Path(folder) / "storescu"):
            os.environ["PATH"] = os.pathsep.join([folder, *(f for f in folders if f != folder)])
            return


def _is_program(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(2) != b"#!"
    except OSError:
        return False
