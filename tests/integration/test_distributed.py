"""Distributed mode: PostgreSQL + Redis, `serve --no-worker` and a separate `spinenode worker`.
A worker killed mid-task loses nothing: every acknowledged image is decoded exactly once."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from dicom_node.db.models import InstanceEvent
from dicom_node.db.session import session_factory
from tests.support.node import (
    DECODED,
    NodeProcess,
    instances,
    storescu,
    wait_for,
    wait_until_settled,
)
from tests.support.samples import make_radiograph, real_cr, with_new_uids

LEASE = "6"


def _events(database_url: str) -> list[tuple[int, str]]:
    with session_factory(database_url)() as session:
        rows = session.scalars(select(InstanceEvent).order_by(InstanceEvent.id))
        return [(event.instance_pk, event.event) for event in rows]


def _statuses(database_url: str) -> Counter:
    return Counter(row.status for row in instances(database_url))


def test_worker_killed_mid_task_loses_nothing(tmp_path: Path, postgres_url: str,
                                              redis_url: str, start_node) -> None:
    env = {"SPINENODE_TASK_LEASE_SECONDS": LEASE}
    node = start_node(postgres_url, broker_url=redis_url, args=("--no-worker",), env=env)
    # Real JPEG 2000 CRs: about half a second each to decode, so a kill lands mid-task.
    files = [with_new_uids(real_cr("RG1_J2KR.dcm"), tmp_path / f"{i}.dcm",
                           BodyPartExamined="LSPINE") for i in range(8)]
    result = storescu(node.port, files, "-xv", "-R")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: _statuses(postgres_url)["queued"] == len(files), 30, what="all queued")

    def new_worker() -> NodeProcess:
        worker = NodeProcess(node.data_dir, postgres_url, broker_url=redis_url,
                             command="worker", env=env)
        return worker.start()

    killed_mid_task = False
    for _ in range(3):  # a kill can land between two tasks; then try again
        worker = new_worker()
        wait_for(lambda: _statuses(postgres_url)["processing"] >= 1, 60,
                 interval=0.02, what="a task in progress")
        worker.kill()
        if _statuses(postgres_url)["processing"] >= 1:
            killed_mid_task = True
            break
    assert killed_mid_task
    assert _statuses(postgres_url)[DECODED] < len(files)

    worker = new_worker()  # the lease runs out; the node's reconciler hands the task out again
    try:
        rows = wait_until_settled(postgres_url, len(files), timeout=120)
    finally:
        worker.stop()
    assert [row.status for row in rows] == [DECODED] * len(files)
    events = _events(postgres_url)
    decoded = Counter(pk for pk, event in events if event == "decoded")
    assert decoded == {row.id: 1 for row in rows}, "each image decoded exactly once"
    expired = {pk for pk, event in events if event == "lease-expired"}
    assert expired, "the killed task was handed out again"
    claims = Counter(pk for pk, event in events if event == "claimed")
    assert all(claims[pk] >= 2 for pk in expired)
    time.sleep(1)
    assert "Traceback" not in node.log()


def test_a_task_longer_than_its_lease_keeps_it(tmp_path: Path, postgres_url: str,
                                               redis_url: str, test_bundle: Path,
                                               start_node) -> None:
    """The worker renews its lease while it works: a 3 s lease outlives a 10 s task."""
    env = {"SPINENODE_TASK_LEASE_SECONDS": "3", "SPINENODE_RECONCILE_INTERVAL_SECONDS": "1",
           "SPINENODE_BUNDLE": str(test_bundle),
           # A batch waits this long for more images that never come: a long task.
           "SPINENODE_BATCH_SIZE": "4", "SPINENODE_BATCH_WAIT_MS": "10000"}
    node = start_node(postgres_url, broker_url=redis_url, args=("--no-worker",), env=env)
    worker = NodeProcess(node.data_dir, postgres_url, broker_url=redis_url, command="worker",
                         env=env).start()
    try:
        assert storescu(node.port, [make_radiograph(tmp_path / "spine.dcm")]).returncode == 0
        rows = wait_until_settled(postgres_url, 1, timeout=120)
    finally:
        worker.stop()
    assert [row.status for row in rows] == ["done"]
    events = [event for _, event in _events(postgres_url)]
    assert events.count("claimed") == 1 and "lease-expired" not in events
