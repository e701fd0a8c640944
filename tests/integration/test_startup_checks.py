"""Start-up checks. A database or broker that cannot be used stops `serve` and `worker` with one
line; a broker that is merely down does not stop the node, and what it acknowledges meanwhile is
queued once the broker is back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dicom_node.cli.common import free_port
from tests.support.fault_peers import OwnRedis
from tests.support.node import SPINENODE, NodeProcess, storescu, wait_for, wait_until_settled
from tests.support.samples import make_radiograph


class PasswordRedis(OwnRedis):
    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--requirepass", "right-password"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def password_redis() -> PasswordRedis:
    server = PasswordRedis()
    server.start()
    yield server
    server.close()


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_broker_that_refuses_us_stops_the_start(tmp_path: Path, sqlite_url: str, command: str,
                                                  broker: str, password_redis: PasswordRedis
                                                  ) -> None:
    url = (f"redis://:wrong-password@127.0.0.1:{password_redis.port}/0" if broker == "redis"
           else "amqp://guest:wrong-password@127.0.0.1:5672//")
    env = NodeProcess(tmp_path / "var", sqlite_url, broker_url=url).env
    subprocess.run([*SPINENODE, "db", "upgrade"], env=env, check=True, capture_output=True)
    result = subprocess.run([*SPINENODE, command], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused us" in lines[0], result.stderr
    assert "wrong-password" not in result.stderr  # the URL is printed with its secret redacted


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_database_that_cannot_be_reached_stops_the_start(tmp_path: Path, command: str) -> None:
    url = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/spinenode"
    env = NodeProcess(tmp_path / "var", url).env
    result = subprocess.run([*SPINENODE, command], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot use database" in lines[0], result.stderr
    assert "secret" not in result.stderr


def _status(node: NodeProcess) -> dict:
    result = subprocess.run([*SPINENODE, "status", "--json"], env=node.env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_broker_down_at_start_gets_the_images_once_back(tmp_path: Path, postgres_url: str,
                                                          start_node) -> None:
    redis = OwnRedis()  # its port is chosen, nothing listens yet
    node = start_node(postgres_url, broker_url=redis.url, args=("--no-worker",))
    assert "unreachable" in node.log()
    files = [make_radiograph(tmp_path / f"{i}.dcm", seed=i) for i in range(3)]
    assert storescu(node.port, files).returncode == 0  # acknowledged: spooled and recorded
    status = _status(node)
    assert status["queue_depth"].startswith("unknown")
    assert status["oldest_waiting"]["status"] == "received"
    redis.start()
    worker = NodeProcess(node.data_dir, postgres_url, broker_url=redis.url,
                         command="worker").start()
    try:
        rows = wait_until_settled(postgres_url, len(files), timeout=120)
        status = _status(node)
    finally:
        worker.stop()
        redis.close()
    assert [row.status for row in rows] == ["waiting-for-model"] * len(files)
    assert status["queue_depth"] == 0 and status["oldest_waiting"] is None  # empty Redis queue


def test_a_database_password_with_escaped_characters_works_and_is_never_shown(
        tmp_path: Path, postgres_url: str) -> None:
    """Pw@rd:/x written escaped in the URL: migrations (Alembic reads the URL through a
    ConfigParser, where % means interpolation), the node's start and its start-up line."""
    url = postgres_url.replace("postgresql://postgres@", "postgresql://postgres:Pw%40rd%3A%2Fx@")
    assert url != postgres_url  # PostgreSQL here trusts local users: any password gets in
    node = NodeProcess(tmp_path / "var", url)
    upgrade = subprocess.run([*SPINENODE, "db", "upgrade"], env=node.env, capture_output=True,
                             text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "postgres:***@127.0.0.1" in upgrade.stdout and "Pw" not in upgrade.stdout
    node.start()
    try:
        assert storescu(node.port, [make_radiograph(tmp_path / "a.dcm")]).returncode == 0
        log = wait_for(lambda: node.log() if "spinenode: SPINENODE listening" in node.log()
                       else None, 30, what="the start-up line")
        assert "database postgresql://postgres:***@127.0.0.1" in log
        assert "Pw" not in log and "%40" not in log
    finally:
        node.stop()
