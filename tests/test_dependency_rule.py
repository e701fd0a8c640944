"""The dependency rule (DESIGN.md, README): dicom_node <- workers <- training. Each package
imports only the packages left of it; the composition root, dicom_node/cli/, is the one place
that may import all three. The node-only process never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

from tests.support.node import NodeProcess, storescu
from tests.support.samples import make_radiograph

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("dicom_node", "workers", "training")  # each may import those before it
COMPOSITION_ROOT = ROOT / "dicom_node" / "cli"
# Heavy libraries the service package must not need.
NOT_IN_THE_NODE = ("torch", "torchvision", "timm", "ultralytics", "cv2")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module that ``path`` imports (absolute names), with its line, lazy imports too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations(root: Path) -> list[str]:
    """Imports in ``root``'s packages that break the rule, as 'file:line imports module'."""
    found = []
    for rank, package in enumerate(ORDER):
        forbidden = set(ORDER[rank + 1:])
        if package == "dicom_node":
            forbidden |= set(NOT_IN_THE_NODE)
        for path in sorted((root / package).rglob("*.py")):
            if COMPOSITION_ROOT in path.parents and root == ROOT:
                continue
            for line, module in imported_modules(path):
                if module.split(".")[0] in forbidden:
                    found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def test_no_package_imports_upward() -> None:
    assert violations(ROOT) == []


def test_the_rule_test_finds_an_upward_import(tmp_path: Path) -> None:
    """The check itself: a fixture tree with one upward and one heavy import in each place."""
    for package in ORDER:
        (tmp_path / package).mkdir()
    (tmp_path / "dicom_node" / "lazy.py").write_text(
        "def f():\n    from workers.runtime import runtime_for\n    import torch\n")
    (tmp_path / "workers" / "up.py").write_text("import training.export\nimport dicom_node\n")
    (tmp_path / "training" / "fine.py").write_text("import workers\nimport dicom_node\n")
    assert violations(tmp_path) == [
        "dicom_node/lazy.py:2 imports workers.runtime",
        "dicom_node/lazy.py:3 imports torch",
        "workers/up.py:1 imports training.export",
    ]


def test_the_node_only_process_never_imports_torch(tmp_path: Path, sqlite_url: str,
                                                   test_bundle: Path) -> None:
    """`serve --no-worker` with a bundle configured (checked at start), taking an image."""
    node = NodeProcess(tmp_path / "var", sqlite_url, args=("--no-worker",),
                       env={"SPINENODE_BUNDLE": str(test_bundle), "PYTHONPROFILEIMPORTTIME": "1"})
    node.start()
    try:
        assert storescu(node.port, [make_radiograph(tmp_path / "spine.dcm")]).returncode == 0
        time.sleep(3)  # the dispatcher queues it and a reconciler round runs (interval 2 s)
    finally:
        node.stop()
    imported = {line.split("|")[-1].strip().split(".")[0]
                for line in node.log().splitlines() if line.startswith("import time:")}
    assert "pynetdicom" in imported and "celery" in imported  # the profile did record imports
    assert not imported & set(NOT_IN_THE_NODE), sorted(imported & set(NOT_IN_THE_NODE))


def test_import_rule_holds_for_the_whole_cli_help() -> None:
    """`spinenode --help` builds every group's parser without importing torch or training."""
    code = ("import sys; from dicom_node.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'training', 'ultralytics')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_one_opencv_package() -> None:
    """Ultralytics brings opencv-python; a second OpenCV package (headless, contrib) would
    write the same cv2 module over it (a known ultralytics problem)."""
    import importlib.metadata

    opencv = sorted({dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()
                     if dist.metadata["Name"].lower().startswith("opencv")})
    assert opencv == ["opencv-python"]
