"""docker-compose.yml is valid (no Docker engine runs here) and the image installs as README's
set-up does."""

from __future__ import annotations

import json
import re
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
    assert {"postgres", "redis", "migrate", "node", "worker", "web"} <= set(services)
    assert services["migrate"]["command"] == ["spinenode", "db", "upgrade"]
    assert services["node"]["command"] == ["spinenode", "serve", "--no-worker"]
    assert services["worker"]["command"] == ["spinenode", "worker"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for name in ("node", "worker"):
        assert "spool:/var/lib/spinenode:rw" in services[name]["volumes"]  # the shared spool
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully")
    assert services["web"]["command"] == ["spinenode", "web"]
    assert services["web"]["ports"] == ["127.0.0.1:8080:8080/tcp"]  # the page: this host only
    # The health checks are the node's own: /health/live, and the worker's heartbeat.
    for name, check in (("node", []), ("web", []), ("worker", ["--worker"])):
        assert services[name]["healthcheck"]["test"] == ["CMD", "spinenode", "health", *check]
    assert services["prometheus"]["profiles"] == ["monitoring"]  # optional
    # Only the workers' image carries torch (Dockerfile: one stage per lock file).
    targets = {name: services[name]["build"]["target"] for name in ("migrate", "node", "web",
                                                                    "worker")}
    assert targets == {"migrate": "node", "node": "node", "web": "node", "worker": "worker"}


def test_monitoring_config_names_metrics_the_node_serves(tmp_path: Path) -> None:
    """The Prometheus scrape target is the node's HTTP port, and every metric the Grafana
    dashboard queries is one /metrics exposes."""
    from prometheus_client import generate_latest

    from dicom_node.db import migrate
    from dicom_node.db.session import session_factory
    from dicom_node.metrics import IntakeMetrics, node_registry

    result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"),
                             "--profile", "monitoring", "config"],
                            capture_output=True, text=True, timeout=60)
    services = yaml.safe_load(result.stdout)["services"]
    assert (f"{ROOT}/monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
            in services["prometheus"]["volumes"])
    scrape = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["node:8080"]

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    registry = node_registry(session_factory(url), lambda: 0)
    IntakeMetrics(registry).stored(0, "CT1", 1000)
    # Every family is declared (# TYPE) even before it has samples; a histogram is queried by
    # its _bucket, _count and _sum series.
    declared = re.findall(r"^# TYPE (spinenode_\w+) (\w+)", generate_latest(registry).decode(),
                          re.M)
    exposed = {name + suffix for name, kind in declared
               for suffix in (("", "_bucket", "_count", "_sum") if kind == "histogram" else ("",))}
    dashboard = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"spinenode_\w+", target["expr"])}
    assert len(dashboard["panels"]) >= 10 and queried
    assert queried <= exposed, queried - exposed


def test_images_install_like_the_readme() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)\n(?:(?!FROM).*\n)*?RUN scripts/setup (--\w+)$",
                        dockerfile, re.M)
    assert dict(stages) == {"worker": "--worker", "node": "--node"}
    assert "scripts/setup" in (ROOT / "scripts" / "demo").read_text()
