"""The node's image has no torch (Dockerfile target `node`, locks/node.txt): `db upgrade`,
`tokens`, `serve --no-worker` and `web` run, take images and answer the API while torch, timm,
ultralytics, OpenCV and the training package cannot be imported; a worker with them (the other
image) analyses what the node took."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.node import SPINENODE, NodeProcess, instances, storescu, wait_for
from tests.support.samples import make_radiograph
from tests.support.web import Http

NOT_IN_THE_NODE_IMAGE = ("torch", "torchvision", "timm", "ultralytics", "cv2", "training")


def _without_torch(folder: Path) -> dict[str, str]:
    """An environment in which importing any of NOT_IN_THE_NODE_IMAGE fails, as if absent."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NotInstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {NOT_IN_THE_NODE_IMAGE!r}:\n"
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
