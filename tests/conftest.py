"""Fixtures: real PostgreSQL and Redis on this machine, a real ``spinenode serve`` subprocess.
The helpers they use live in ``tests/support``."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.support import no_network
from tests.support.dcmtk import put_dcmtk_first_on_path
from tests.support.node import POSTGRES_ADMIN_URL, REDIS_HOST_URL, NodeProcess

no_network.block()  # every test in this process: only this machine is reachable
put_dcmtk_first_on_path()


@pytest.fixture(scope="session")
def test_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One random-weight bundle of the real architectures at 64 px, shared by the session."""
    from tests.support.bundles import make_test_bundle

    return make_test_bundle(tmp_path_factory.mktemp("bundles") / "test-bundle")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    name = f"spinenode_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    from dicom_node.db.session import engine_for

    engine_for(f"{base}/{name}").dispose()
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    (tmp_path / "var").mkdir(exist_ok=True)
    return f"sqlite:///{tmp_path / 'var' / 'spinenode.sqlite'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return request.getfixturevalue(fixture)


@pytest.fixture
def redis_url() -> Iterator[str]:
    # A database index of its own per test keeps parallel runs from sharing a queue: each of
    # pytest-xdist's test processes draws from its own share of indexes 1-15.
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    share = max(1, 15 // count)
    index = 1 + (worker * share + uuid.uuid4().int % share) % 15
    url = f"{REDIS_HOST_URL}/{index}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def start(database_url: str, **kwargs: object) -> NodeProcess:
        node = NodeProcess(tmp_path / "var", database_url, **kwargs).start()  # type: ignore[arg-type]
        started.append(node)
        return node

    yield start
    for node in reversed(started):
        node.stop()


