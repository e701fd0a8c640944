"""docker-compose.yml is valid (no Docker engine runs here) and the image installs as README's
set-up does."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_is_valid() -> None:
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert {"postgres", "redis", "migrate", "node", "worker"} <= set(services)
    assert services["migrate"]["command"] == ["spinenode", "db", "upgrade"]
    assert services["node"]["command"] == ["spinenode", "serve", "--no-worker"]
    assert services["worker"]["command"] == ["spinenode", "worker"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for name in ("node", "worker"):
        assert "spool:/var/lib/spinenode:rw" in services[name]["volumes"]  # the shared spool
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully")
        assert "healthcheck" in services[name]


def test_image_installs_like_the_readme() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "RUN scripts/setup\n" in dockerfile
    assert "scripts/setup" in (ROOT / "scripts" / "demo").read_text()
