"""What made a bundle: the libraries, the code and the data, recorded in its manifest so that
a bundle's behaviour can be traced (and reproduced) from the bundle alone."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

from workers.bundle import RECORDED_LIBRARIES, installed_version

ROOT = Path(__file__).resolve().parent.parent


def library_versions() -> dict[str, str]:
    """The versions of the libraries whose behaviour the weights depend on, and Python's."""
    versions = {name: installed_version(name) or "not installed" for name in RECORDED_LIBRARIES}
    return {**versions, "python": platform.python_version()}


def git_commit() -> str | None:
    """The commit of this checkout (with ``-dirty`` when it has uncommitted changes); None
    outside a git checkout (an installed package)."""
    if not (ROOT / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], check=True, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit
