"""The lock files (locks/, made by scripts/lock, installed by scripts/setup) pin what
pyproject.toml asks for, each smaller one within the largest, which CI installs hash-checked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"node": [], "worker": ["inference"], "training": ["inference", "training"],
         "test": ["inference", "training", "test"]}
TORCH = {"torch", "torchvision", "timm", "ultralytics", "opencv-python"}


def _entries(lock: str) -> dict[str, str]:
    """name -> the whole entry (pin and hashes) of one lock file."""
    text = (ROOT / "locks" / f"{lock}.txt").read_text()
    blocks = re.findall(r"^([A-Za-z0-9][^\s=]*)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})+)",
                        text, re.M)
    assert blocks, f"locks/{lock}.txt pins nothing"
    return {canonicalize_name(name): f"{version}{hashes}" for name, version, hashes in blocks}


def _declared(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in requirements if canonicalize_name(r.name) != "spinenode"]


@pytest.mark.parametrize("lock", LOCKS)
def test_each_lock_pins_what_pyproject_asks_for(lock: str) -> None:
    entries = _entries(lock)
    for requirement in _declared(LOCKS[lock]):
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{name} is not in locks/{lock}.txt: run scripts/lock"
        version = entries[name].split()[0]
        assert requirement.specifier.contains(version, prereleases=True), \
            f"locks/{lock}.txt pins {name}=={version}, pyproject asks {requirement}: scripts/lock"


@pytest.mark.parametrize("lock", ["node", "worker", "training"])
def test_smaller_locks_are_within_the_installed_one(lock: str) -> None:
    """Same versions and hashes as locks/test.txt, which every CI run installs hash-checked."""
    everything = _entries("test")
    entries = _entries(lock)
    assert {name: entry for name, entry in entries.items() if everything.get(name) != entry} == {}
    assert len(entries) < len(everything)


def test_the_node_lock_has_no_torch_and_every_lock_one_opencv() -> None:
    assert not TORCH & set(_entries("node"))
    for lock in LOCKS:
        assert len([name for name in _entries(lock) if name.startswith("opencv")]) <= 1
    assert TORCH <= set(_entries("worker"))
