"""`spinenode demo` end to end (with the test bundle, so no training here): images go in over
C-STORE, the SR and SC come back to the demo's receiver, the summary says what was found."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import SPINENODE, free_port


def test_demo_shows_results_coming_back(tmp_path: Path, test_bundle: Path) -> None:
    env = {**os.environ, "SPINENODE_DATA_DIR": str(tmp_path / "var"),
           "SPINENODE_BUNDLE": str(test_bundle)}
    result = subprocess.run([*SPINENODE, "demo", "--exit", "--count", "2", "--port",
                             str(free_port())], env=env, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.count("-> status 0x0000") == 2
    assert out.count("(p = ") == 2 and "findings:" in out
    assert "4 result objects delivered" in out
    received = sorted((tmp_path / "var" / "demo" / "received").glob("*.dcm"))
    assert [path.name[:3] for path in received] == ["OT-", "OT-", "SR-", "SR-"]
