"""The reconciler re-sends what a crash left half way, through the real embedded broker."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from kombu import Connection
from kombu.exceptions import OperationalError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.cli.common import free_port
from dicom_node.config import Settings, load_settings
from dicom_node.db import migrate
from dicom_node.db.models import Instance, InstanceStatus, Patient, Series, Study, utcnow
from dicom_node.db.session import session_factory
from dicom_node.dispatch import reconcile
from tests.support.fault_peers import dropping_connections
from tests.support.node import wait_for
from workers.tasks import QUEUE, TaskQueue


def _instance(session, uid: str, status: InstanceStatus, age_seconds: float,
              lease_in: float | None = None) -> None:
    series = session.scalar(select(Series))
    if series is None:
        series = Series(series_uid="1.2.3", study=Study(study_uid="1.2",
                                                        patient=Patient(patient_id="P")))
    then = utcnow() - timedelta(seconds=age_seconds)
    session.add(Instance(
        sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", series=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1, sha256="0" * 64,
        spool_path="/nonexistent", status=status, received_at=then, queued_at=then,
        lease_until=None if lease_in is None else utcnow() + timedelta(seconds=lease_in),
    ))


def _embedded_node(tmp_path: Path) -> tuple[Settings, sessionmaker[Session], TaskQueue]:
    """Settings, a migrated SQLite database and the embedded queue, as `serve` has them."""
    settings = load_settings(data_dir=tmp_path, reconcile_grace_seconds=30,
                             incoming_stale_seconds=60)
    settings.make_dirs()
    migrate.upgrade(settings.effective_database_url)
    return settings, session_factory(settings.effective_database_url), TaskQueue(settings)


def test_reconcile_requeues_what_was_left_half_way(tmp_path: Path) -> None:
    settings, sessions, tasks = _embedded_node(tmp_path)
    with sessions.begin() as session:
        _instance(session, "1.1", InstanceStatus.RECEIVED, age_seconds=120)  # never queued
        _instance(session, "1.2", InstanceStatus.RECEIVED, age_seconds=1)  # still in flight
        _instance(session, "1.3", InstanceStatus.QUEUED, age_seconds=120)  # message lost
        _instance(session, "1.4", InstanceStatus.PROCESSING, 120, lease_in=-5)  # worker died
        _instance(session, "1.5", InstanceStatus.PROCESSING, 120, lease_in=300)  # working
        _instance(session, "1.6", InstanceStatus.DONE, age_seconds=120)
    assert tasks.depth() == 0

    report = reconcile(settings, sessions, tasks.enqueue_analysis, tasks.depth)
    with sessions() as session:
        ids = {row.sop_instance_uid: row.id for row in session.scalars(select(Instance))}
    assert report.never_queued == [ids["1.1"]]
    assert report.lost_from_broker == [ids["1.3"]]
    assert report.lease_expired == [ids["1.4"]]
    assert tasks.depth() == 3
    with sessions() as session:
        status = {row.sop_instance_uid: row.status for row in session.scalars(select(Instance))}
    assert status == {"1.1": "queued", "1.2": "received", "1.3": "queued", "1.4": "queued",
                      "1.5": "processing", "1.6": "done"}

    # The broker now holds the queued ones: a second round sends nothing twice.
    again = reconcile(settings, sessions, tasks.enqueue_analysis, tasks.depth)
    assert again.total == 0 and tasks.depth() == 3


def _broker_down_depth() -> int:
    """The queue depth asked of a Redis that is not there (nothing listens on the port)."""
    with Connection(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1,
                    transport_options={"max_retries": 0}) as connection:
        connection.ensure_connection(max_retries=1)
        return connection.default_channel.queue_declare(QUEUE, passive=True).message_count


def test_each_duty_runs_when_another_fails(tmp_path: Path) -> None:
    settings, sessions, tasks = _embedded_node(tmp_path)
    with sessions.begin() as session:
        _instance(session, "1.1", InstanceStatus.RECEIVED, age_seconds=120)  # never queued
        _instance(session, "1.3", InstanceStatus.QUEUED, age_seconds=120)  # message lost
        _instance(session, "1.4", InstanceStatus.PROCESSING, 120, lease_in=-5)  # worker died
    stale = settings.incoming_dir / "tmpabandoned.dcm"
    stale.write_bytes(b"half a data set")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    fresh = settings.incoming_dir / "tmpreceiving.dcm"
    fresh.write_bytes(b"a transfer under way")

    report = reconcile(settings, sessions, tasks.enqueue_analysis, _broker_down_depth)
    assert report.failed_duties == ["lost from the broker"]
    assert len(report.never_queued) == 1 and len(report.lease_expired) == 1
    assert report.stale_files_removed == [stale.name]
    assert fresh.exists() and not stale.exists()
    assert tasks.depth() == 2
    # The broker answers again: the lost message is sent on the next round.
    again = reconcile(settings, sessions, tasks.enqueue_analysis, tasks.depth)
    assert again.failed_duties == [] and tasks.depth() == 2  # not empty: nothing counted lost


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A vhost of its own on the machine's RabbitMQ (guest/guest), deleted afterwards."""
    vhost = f"spinenode-{uuid.uuid4().hex[:8]}"
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    subprocess.run([*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                   check=True, capture_output=True, timeout=60)
    yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    subprocess.run([*ctl, "delete_vhost", vhost], capture_output=True, timeout=60)


@pytest.mark.parametrize("broker", ["embedded", "redis", "rabbitmq"])
def test_an_empty_queue_is_depth_zero(tmp_path: Path, broker: str,
                                      request: pytest.FixtureRequest) -> None:
    url = "embedded" if broker == "embedded" else request.getfixturevalue(f"{broker}_url")
    settings = load_settings(data_dir=tmp_path, broker_url=url)
    settings.make_dirs()
    tasks = TaskQueue(settings)
    assert tasks.depth() == 0  # a queue no one declared yet (Redis: no key at all)
    tasks.enqueue_analysis(1)
    tasks.enqueue_analysis(2)
    assert wait_for(lambda: tasks.depth() == 2, 10, what="two messages")
    with tasks.app.connection_for_write() as connection:  # a worker takes both
        queue = tasks.app.amqp.queues[QUEUE].bind(connection.default_channel)
        while (message := queue.get(no_ack=False)) is not None:
            message.ack()
    assert tasks.depth() == 0


def test_the_embedded_queue_writes_only_under_the_data_dir(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(data_dir=tmp_path / "var")
    settings.make_dirs()
    tasks = TaskQueue(settings)
    tasks.enqueue_analysis(1)
    assert tasks.depth() == 1
    assert list(elsewhere.iterdir()) == []  # kombu's control exchange went under the data dir


def test_a_database_restart_renews_every_lease(postgres_url: str) -> None:
    """A lease that ran out while PostgreSQL was down is not taken from its holder until the
    database has been up a whole lease: the holder may be alive, about to write its result."""
    from sqlalchemy import text

    from dicom_node.db.leases import take

    migrate.upgrade(postgres_url)
    sessions = session_factory(postgres_url)
    with sessions.begin() as session:
        _instance(session, "1.4", InstanceStatus.PROCESSING, 120, lease_in=-5)
    with sessions() as session:
        up_for = session.scalar(
            text("SELECT extract(epoch FROM now() - pg_postmaster_start_time())"))
        pk = session.scalar(select(Instance.id))
    processing = Instance.status == InstanceStatus.PROCESSING

    def taken(lease_seconds: float) -> bool:
        with sessions.begin() as session:
            return take(session, Instance, pk, Instance.status == InstanceStatus.RECEIVED,
                        processing, lease_seconds)

    assert not taken(float(up_for) + 30)  # "restarted" within the lease: still its holder's
    assert taken(float(up_for) / 2)  # up longer than a lease: the worker died
    assert not taken(float(up_for) / 2)  # and now ours, under a lease of its own


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_broker_host_that_drops_connections_costs_seconds(tmp_path: Path, scheme: str) -> None:
    # The node's dispatcher and the workers send tasks; where the broker's host drops packets
    # a send gives up after Celery's connect timeout and the reconciler sends it later.
    with dropping_connections() as port:
        settings = load_settings(data_dir=tmp_path, broker_url=f"{scheme}://127.0.0.1:{port}/")
        tasks = TaskQueue(settings)
        for send in (lambda: tasks.enqueue_analysis(1), tasks.depth):
            began = time.monotonic()
            with pytest.raises(OperationalError):
                send()
            assert time.monotonic() - began < 20
