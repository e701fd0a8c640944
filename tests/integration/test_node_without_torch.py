"""The node's image has no torch (Dockerfile target `node`, locks/node.txt): `db upgrade`,
`tokens`, `serve --no-worker` and `web` run, take images and answer the API while torch, timm,
ultralytics, OpenCV and the training package cannot be imported; a worker with them (the other
image) analyses what the node took."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.node import (
    SPINENODE,
    NodeProcess,
    free_port,
    instances,
    storescu,
    wait_for,
)
from tests.support.samples import make_radiograph
from tests.support.web import Http

NOT_IN_THE_NODE_IMAGE = ("torch", "torchvision", "timm", "ultralytics", "cv2", "training")


def _without_torch(folder: Path, absent: tuple[str, ...] = NOT_IN_THE_NODE_IMAGE
                   ) -> dict[str, str]:
    """An environment in which importing any of ``absent`` fails, as if not installed."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NotInstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {absent!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, _NotInstalled())\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder),
                                                         os.environ.get("PYTHONPATH")]))}


def test_the_node_runs_without_torch(tmp_path: Path, postgres_url: str, redis_url: str,
                                     test_bundle: Path, start_node) -> None:
    no_torch = _without_torch(tmp_path / "no-torch")
    probe = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, **no_torch},
                           capture_output=True, text=True)
    assert "No module named 'torch'" in probe.stderr  # the environment is what it claims

    env = {**no_torch, "SPINENODE_BUNDLE": str(test_bundle)}  # checked at start, without torch
    node = start_node(postgres_url, broker_url=redis_url, args=("--no-worker",), env=env)
    token = subprocess.run([*SPINENODE, "tokens", "create", "admin", "--role", "viewer"],
                           env=node.env, capture_output=True, text=True, timeout=60, check=True)
    image = make_radiograph(tmp_path / "spine.dcm")
    result = storescu(node.port, [image])
    assert result.returncode == 0, result.stderr
    wait_for(lambda: [row.status for row in instances(postgres_url)] == ["queued"], 30,
             what="the image queued")
    http = Http(node.http_port, token.stdout.strip())
    assert http.get("/health/live")[0] == 200
    assert http.get("/api/v1/instances")[1]["items"][0]["status"] == "queued"

    # The workers' image, with torch: it analyses what the node took.
    worker = NodeProcess(node.data_dir, postgres_url, broker_url=redis_url, command="worker",
                         env={"SPINENODE_BUNDLE": str(test_bundle)}).start()
    try:
        wait_for(lambda: [row.status for row in instances(postgres_url)] == ["done"], 120,
                 what=f"the image analysed (worker log: {worker.log()})")
    finally:
        worker.stop()
    assert "Traceback" not in node.log() and "No module named" not in node.log()


def test_the_demo_takes_images_before_torch_is_installed(tmp_path: Path) -> None:
    """scripts/demo installs the node's packages only, then `spinenode demo --setup
    scripts/setup`: on a first run the node (its embedded worker too) answers, makes the
    phantoms and takes images without torch, which the set-up installs meanwhile. Here the
    stand-in set-up waits until the images wait for a model, then fails: the demo says so."""
    # The demo imports training (its phantoms), not the packages training needs.
    no_torch = _without_torch(tmp_path / "no-torch", tuple(
        name for name in NOT_IN_THE_NODE_IMAGE if name != "training"))
    data_dir = tmp_path / "var"
    database = data_dir / "spinenode.sqlite"
    setup = tmp_path / "setup.py"
    setup.write_text(
        "import sqlite3, sys, time\n"
        "deadline = time.time() + 120\n"
        "while time.time() < deadline:\n"
        f"    rows = sqlite3.connect({str(database)!r}).execute(\n"
        "        'select status from instances').fetchall()\n"
        "    if rows and all(row == ('waiting-for-model',) for row in rows):\n"
        "        print(len(rows), 'waiting')\n"
        "        sys.exit(3)\n"
        "    time.sleep(0.5)\n")
    env = {**os.environ, **no_torch, "SPINENODE_DATA_DIR": str(data_dir),
           "SPINENODE_HTTP_PORT": "0"}
    result = subprocess.run([*SPINENODE, "demo", "--exit", "--count", "2", "--port",
                             str(free_port()), "--setup", f"{sys.executable} {setup}"],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "answers C-ECHO" in result.stdout and result.stdout.count("-> status 0x0000") == 2
    assert "installing the packages that train failed (status 3); see " in result.stderr
    assert (data_dir / "demo" / "setup.log").read_text() == "2 waiting\n"
    assert "No module named" not in result.stderr  # nothing tried to import torch
