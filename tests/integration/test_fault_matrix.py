"""The fault matrix: images streamed at a steady rate while one fault strikes, against services
the test itself starts and kills (its own Redis and PostgreSQL on free ports, DCMTK storescp as
the PACS, the node and workers as real processes with the test bundle).

For every row: each image acknowledged with 0x0000 is analysed exactly once and its SR and SC
arrive at the PACS exactly once, within BOUND_SECONDS of the last image sent; an image refused
during an outage is refused with 0xA7xx and leaves no row; nothing is left in spool/incoming.
Intervals are shortened by settings (lease, reconciler, delivery backoff), not in the code.
SPINENODE_FAULT_FULL=1 runs the rows at the sizes of the hand-made matrix in issue 9 (40 images
at one a second; Redis down 10 s, PostgreSQL 15 s, worker 10 s, PACS 60 s, node 5 s), and
SPINENODE_FAULT_BUNDLE=PATH with another bundle (the demo's, as there) instead of the tiny one.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.config import load_settings
from dicom_node.db.models import (
    Analysis,
    Delivery,
    Instance,
    InstanceEvent,
    Output,
    StudyReport,
)
from dicom_node.db.session import session_factory
from dicom_node.study_reports import studies_to_report
from tests.support.fault_peers import Modality, OwnPostgres, OwnRedis, Pacs, Sent, send
from tests.support.node import NodeProcess, wait_for
from tests.support.samples import make_radiograph
from workers.tasks import QUEUE, TaskQueue

pytestmark = pytest.mark.slow

FULL = os.environ.get("SPINENODE_FAULT_FULL") == "1"
IMAGES, INTERVAL = (40, 1.0) if FULL else (16, 0.5)  # images streamed, seconds apart
DOWN = ({"redis": 10, "postgres": 15, "worker": 10, "pacs": 60, "node": 5} if FULL else
        {"redis": 6, "postgres": 8, "worker": 5, "pacs": 9, "node": 3})  # seconds
LEASE_SECONDS = 6
BOUND_SECONDS = 120  # from the last image sent to every result delivered
SHORT = {
    "SPINENODE_TASK_LEASE_SECONDS": str(LEASE_SECONDS),
    "SPINENODE_RECONCILE_INTERVAL_SECONDS": "1",
    "SPINENODE_RECONCILE_GRACE_SECONDS": "2",
    "SPINENODE_DELIVERY_RETRY_SECONDS": "1",
    "SPINENODE_DELIVERY_MAX_BACKOFF_SECONDS": "4",
    "SPINENODE_MAX_DELIVERY_ATTEMPTS": "30",
}
TERMINAL = {"done", "failed", "skipped", "waiting-for-model"}


@dataclass
class Row:
    fault: str
    sent: int
    acked: int
    refused_a7xx: int
    no_answer: int
    analysed_once: int
    analysed_twice: int
    sr_delivered: int
    sc_delivered: int
    stuck: int
    settled_seconds: float  # after the last image was sent
    worst_stored_to_delivered_seconds: float  # the slowest image: row written -> results at PACS


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    server.start()
    yield server
    server.close()


class Rig:
    """One scenario's node, workers, broker, database and PACS; stopped at the end."""

    def __init__(self, tmp_path: Path, bundle: Path, database_url: str, broker_url: str,
                 pacs: Pacs, redis: OwnRedis | None, env: dict[str, str] | None = None):
        self.tmp_path = tmp_path
        self.redis = redis
        self.data_dir = tmp_path / "var"
        self.database_url = database_url
        self.broker_url = broker_url
        self.pacs = pacs
        self.env = {**SHORT, "SPINENODE_BUNDLE": str(bundle),
                    "SPINENODE_DESTINATIONS": pacs.destination, **(env or {})}
        self.processes: list[NodeProcess] = []
        self.port: int | None = None

    def node(self, *args: str) -> NodeProcess:
        process = NodeProcess(self.data_dir, self.database_url, broker_url=self.broker_url,
                              args=args, env=self.env, port=self.port).start()
        self.port = process.port
        self.processes.append(process)
        return process

    def worker(self) -> NodeProcess:
        process = NodeProcess(self.data_dir, self.database_url, broker_url=self.broker_url,
                              command="worker", env=self.env).start()
        self.processes.append(process)
        wait_for(lambda: process._alive() and " ready." in process.log(), 60,
                 what="the worker to take tasks")
        return process

    def images(self, count: int) -> list[Path]:
        folder = self.tmp_path / "images"
        folder.mkdir(exist_ok=True)
        first = len(list(folder.iterdir()))  # new files each call: a stream may still be reading
        return [make_radiograph(folder / f"{i}.dcm", seed=i) for i in range(first, first + count)]

    def stream(self, count: int = IMAGES, interval: float = INTERVAL) -> Modality:
        assert self.port is not None
        return Modality(self.images(count), self.port, interval).start()

    def count_events(self, event: str) -> int:
        with session_factory(self.database_url)() as session:
            return session.scalar(select(func.count()).select_from(InstanceEvent)
                                  .where(InstanceEvent.event == event)) or 0

    def logs(self) -> str:
        return "\n".join(f"--- {p.command} log ---\n{p.log()[-6000:]}" for p in self.processes)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.pacs.stop()


@pytest.fixture
def rig_for(tmp_path: Path, test_bundle: Path, own_postgres: OwnPostgres
            ) -> Iterator[Callable[..., Rig]]:
    """rig_for(embedded=False, env=None): PostgreSQL + own Redis, or SQLite + embedded queue."""
    rigs: list[Rig] = []
    brokers: list[OwnRedis] = []
    bundle = Path(os.environ.get("SPINENODE_FAULT_BUNDLE") or test_bundle)  # e.g. the demo's

    def make(embedded: bool = False, env: dict[str, str] | None = None) -> Rig:
        pacs = Pacs(tmp_path / "pacs")
        pacs.start()
        if embedded:
            (tmp_path / "var").mkdir(parents=True, exist_ok=True)
            database_url = f"sqlite:///{tmp_path / 'var' / 'spinenode.sqlite'}"
            broker_url = "embedded"
        else:
            database_url = own_postgres.create_database(f"fault_{uuid.uuid4().hex[:10]}")
            redis = OwnRedis()
            redis.start()
            brokers.append(redis)
            broker_url = redis.url
        rig = Rig(tmp_path, bundle, database_url, broker_url, pacs,
                  None if embedded else brokers[-1], env)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.stop()
    for redis in brokers:
        redis.close()


def _outbox_of(sessions, instance_pk: int) -> str:  # noqa: ANN001
    """What the database says was made and sent for one image: for a failure's message."""
    lines = []
    with sessions() as session:
        analysis_ids = set(session.scalars(select(Analysis.id).where(
            Analysis.instance_pk == instance_pk)))
        outputs = list(session.scalars(select(Output).where(
            Output.analysis_pk.in_(analysis_ids))))
        for report in session.scalars(select(StudyReport)):
            if analysis_ids & set(report.analysis_ids):
                lines.append(f"report {report.id} v{report.version} of study {report.study_pk}: "
                             f"analyses {report.analysis_ids}, made {report.created_at}")
                outputs += report.outputs
        for output in outputs:
            lines.append(f"  {output.kind} {output.sop_instance_uid} at {output.path} "
                         f"(exists: {Path(output.path).exists()})")
            lines += [f"    delivery {d.id} to {d.destination}: {d.status}, {d.attempts} "
                      f"attempts, delivered {d.delivered_at}, last error {d.last_error!r}"
                      for d in output.deliveries]
    return "\n".join(lines)


def settle_and_check(rig: Rig, fault: str, sent: list[Sent]) -> Row:
    """Wait until every stored image is finished and its results delivered, then assert the
    promises of the matrix and return the row."""
    sessions = session_factory(rig.database_url)
    started = time.monotonic()

    def settled() -> bool:
        # In this order, each query after the one before it: a report (with its deliveries)
        # committed between the deliveries' count and the check for studies to report would
        # otherwise read as settled with its SR never sent.
        with sessions() as session:
            if not set(session.scalars(select(Instance.status))) <= TERMINAL:
                return False
        # Every study reported (each streamed image is a study of its own), and sent.
        if studies_to_report(sessions, 0):
            return False
        with sessions() as session:
            return not session.scalar(select(func.count()).select_from(Delivery)
                                      .where(Delivery.status != "delivered"))

    try:
        wait_for(settled, BOUND_SECONDS, interval=0.5, what=f"{fault}: all results delivered")
    except AssertionError:
        raise AssertionError(f"{fault}: not settled within {BOUND_SECONDS} s\n{rig.logs()}"
                             ) from None
    settled_seconds = time.monotonic() - started

    with sessions() as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        rows_by_pk = {row.id: row for row in rows.values()}
        analyses = Counter(session.scalars(select(Analysis.instance_pk)))
        analysed_events = Counter(session.scalars(
            select(InstanceEvent.instance_pk).where(InstanceEvent.event == "analysed")))
        # (instance, kind) -> our object's UID: the SC from the image's analysis, the SR from
        # the report of its study.
        outputs = {(pk, kind): uid for pk, kind, uid in session.execute(
            select(Analysis.instance_pk, Output.kind, Output.sop_instance_uid)
            .join(Output.analysis))}
        instance_of = dict(session.execute(select(Analysis.id, Analysis.instance_pk)).all())
        for report in session.scalars(select(StudyReport)):
            for analysis_id in report.analysis_ids:
                for output in report.outputs:
                    outputs[(instance_of[analysis_id], output.kind)] = output.sop_instance_uid
        delivered_at = dict(session.execute(
            select(Output.sop_instance_uid, func.max(Delivery.delivered_at))
            .join(Delivery.output).group_by(Output.sop_instance_uid)).all())
        waits = [(delivered_at[uid] - rows_by_pk[pk].received_at).total_seconds()
                 for (pk, _), uid in outputs.items() if delivered_at.get(uid)]
    received = rig.pacs.received()

    acked = [s for s in sent if s.status == 0]
    refused = [s for s in sent if s.status is not None and s.status != 0]
    for item in refused:
        assert item.status & 0xFF00 == 0xA700, f"{fault}: refused with {item.status:#06x}"
        assert item.uid not in rows, f"{fault}: an image refused with 0xA7xx left a row"
    missing = [s.uid for s in acked if s.uid not in rows]
    assert not missing, f"{fault}: acknowledged images without a row: {missing}"
    # Every stored image (acknowledged, or stored just before the node died unheard) counts.
    stored = list(rows.values())
    stuck = [row.sop_instance_uid for row in stored if row.status != "done"]
    assert not stuck, f"{fault}: not analysed: {[(r, rows[r].status) for r in stuck]}"
    assert all(analyses[row.id] == 1 == analysed_events[row.id] for row in stored), \
        f"{fault}: analysed more than once: {analyses}"
    for row in stored:
        for kind in ("sr", "sc"):
            uid = outputs.get((row.id, kind))
            assert uid is not None, f"{fault}: no {kind} for {row.sop_instance_uid}"
            assert received[uid] == 1, (f"{fault}: {kind} of {row.id} arrived {received[uid]}x\n"
                                        f"{_outbox_of(sessions, row.id)}\nPACS has {received}\n"
                                        f"{rig.logs()}")
    assert sum(received.values()) == len(outputs), f"{fault}: the PACS got extra objects"
    leftovers = list((rig.data_dir / "spool" / "incoming").iterdir())
    assert not leftovers, f"{fault}: partial files left: {leftovers}"
    for process in rig.processes:
        assert "Traceback" not in process.log(), f"{fault}: {process.command}:\n{process.log()}"

    row = Row(fault=fault, sent=len(sent), acked=len(acked),
              refused_a7xx=len(refused), no_answer=sum(s.status is None for s in sent),
              analysed_once=sum(analyses[r.id] == 1 for r in stored),
              analysed_twice=sum(analyses[r.id] > 1 for r in stored),
              sr_delivered=sum(received[outputs[(r.id, "sr")]] for r in stored),
              sc_delivered=sum(received[outputs[(r.id, "sc")]] for r in stored),
              stuck=len(stuck), settled_seconds=round(settled_seconds, 1),
              worst_stored_to_delivered_seconds=round(max(waits, default=0.0), 1))
    print(json.dumps(asdict(row)))
    report = os.environ.get("SPINENODE_FAULT_REPORT")
    if report:
        with open(report, "a") as handle:
            handle.write(json.dumps(asdict(row)) + "\n")
    return row


def test_redis_killed_and_restarted(rig_for) -> None:
    rig = rig_for()
    rig.node("--no-worker")
    rig.worker()
    modality = rig.stream()
    time.sleep(3)
    assert rig.redis is not None
    rig.redis.kill()
    time.sleep(DOWN["redis"])
    rig.redis.start()
    row = settle_and_check(rig, f"Redis SIGKILL, back after {DOWN['redis']} s", modality.join())
    assert row.acked == row.sent  # the node keeps taking images while the queue is gone


@pytest.mark.parametrize("worker", ["cold", "warm"])
def test_postgres_stopped_and_restarted(rig_for, own_postgres: OwnPostgres, worker: str) -> None:
    # Two worker processes: while one holds its finished work until the database is back, the
    # other goes on taking tasks from the broker and meets the outage at its claim.
    rig = rig_for(env={"SPINENODE_WORKER_CONCURRENCY": "2"})
    rig.node("--no-worker")
    if worker == "cold":
        # A backlog waits; the worker has claimed its first image and is still loading the
        # model when the database goes.
        modality = rig.stream(IMAGES + 4)
        wait_for(lambda: rig.count_events("requeued") + rig.count_events("received") >= 6, 30,
                 what="a backlog")
        rig.worker()
        wait_for(lambda: rig.count_events("claimed") >= 1, 60, interval=0.05,
                 what="the first claim")
        warm_up: list[Sent] = []
    else:
        rig.worker()
        # Warm: one image analysed (the model loaded) before the stream starts, so the outage
        # comes while images are still arriving however slow the machine is.
        warm_up = rig.stream(1).join()
        wait_for(lambda: rig.count_events("analysed") >= 1, 120, interval=0.1,
                 what="the model loaded")
        modality = rig.stream(IMAGES + 4)
        wait_for(lambda: rig.count_events("analysed") >= 3, 90, interval=0.1,
                 what="a warm worker")
    own_postgres.stop_immediately()
    # However fast the machine started the worker, a modality sends during the outage.
    during = rig.stream(2, interval=DOWN["postgres"] / 4)
    time.sleep(DOWN["postgres"])
    own_postgres.start()
    sent_during = during.join()
    row = settle_and_check(rig, f"PostgreSQL stopped (immediate), back after {DOWN['postgres']} "
                                f"s, {worker} worker", warm_up + modality.join() + sent_during)
    # Images sent during the outage are refused (0xA7xx, the sender retries), not lost.
    statuses = [s.status for s in sent_during]
    assert all(status is not None and status & 0xFF00 == 0xA700 for status in statuses), statuses
    assert row.refused_a7xx >= len(sent_during)


def test_a_task_that_cannot_reach_the_database_is_retried(rig_for, own_postgres: OwnPostgres
                                                          ) -> None:
    """A worker takes a task while the database is down: the task comes back with backoff
    instead of vanishing, and the claim, once it succeeds, says why it was late."""
    rig = rig_for(env={"SPINENODE_RECONCILE_GRACE_SECONDS": "600"})  # no help from the node
    node = rig.node("--no-worker")
    assert send(make_radiograph(rig.tmp_path / "spine.dcm"), node.port) == 0
    wait_for(lambda: rig.count_events("requeued") + rig.count_events("received") >= 1, 30,
             what="the image recorded")
    tasks = TaskQueue(load_settings(data_dir=rig.data_dir, broker_url=rig.broker_url))
    # The node's dispatcher queues the image just after recording it: wait for that message,
    # or the purge below may come before it and the worker gets it early.
    wait_for(lambda: tasks.depth() >= 1, 30, what="the node's task in the broker")
    with tasks.app.connection_for_write() as connection:  # hold its message back for now
        tasks.app.amqp.queues[QUEUE].bind(connection.default_channel).purge()
    with session_factory(rig.database_url)() as session:
        instance_id = session.scalars(select(Instance.id)).one()
    rig.worker()
    own_postgres.stop_immediately()
    tasks.enqueue_analysis(instance_id)  # the worker takes it at once and cannot claim it
    time.sleep(6)  # retried after 1, 2, 4 s while the database is away
    own_postgres.start()
    settle_and_check(rig, "task taken while PostgreSQL is down", [])
    with session_factory(rig.database_url)() as session:
        claims = session.scalars(select(InstanceEvent.detail)
                                 .where(InstanceEvent.event == "claimed")).all()
    assert len(claims) == 1 and "after database unavailable" in claims[0], claims


def test_worker_killed_mid_batch(rig_for) -> None:
    rig = rig_for(env={"SPINENODE_BATCH_SIZE": "4", "SPINENODE_BATCH_WAIT_MS": "500"})
    rig.node("--no-worker")
    modality = rig.stream(interval=INTERVAL / 2)
    wait_for(lambda: rig.count_events("requeued") + rig.count_events("received") >= 8, 30,
             what="a backlog")
    worker = rig.worker()
    wait_for(lambda: rig.count_events("claimed") >= 2, 60, interval=0.02, what="a batch claimed")
    worker.kill()
    time.sleep(DOWN["worker"])
    rig.worker()
    row = settle_and_check(rig, f"worker SIGKILL mid-batch, new one after {DOWN['worker']} s",
                           modality.join())
    assert rig.count_events("lease-expired") >= 1  # the dead worker's claims were handed out
    assert row.acked == row.sent


def test_pacs_down_longer_than_two_backoff_steps(rig_for) -> None:
    rig = rig_for()
    rig.node("--no-worker")
    rig.worker()
    modality = rig.stream()
    time.sleep(3)
    rig.pacs.stop()
    down_since = time.monotonic()

    def met_the_outage_three_times() -> int:
        with session_factory(rig.database_url)() as session:
            return session.scalar(select(func.count()).select_from(Delivery)
                                  .where(Delivery.attempts >= 3))

    # Down for its time and until a delivery has met it three times (backoff 1, 2, 4 s): on a
    # busy machine the first analyses, and so the first attempts, come later.
    wait_for(met_the_outage_three_times, 120, interval=0.5,
             what="a delivery to meet the PACS down three times")
    time.sleep(max(0.0, DOWN["pacs"] - (time.monotonic() - down_since)))
    down = time.monotonic() - down_since
    rig.pacs.start()
    row = settle_and_check(rig, f"PACS down {down:.0f} s", modality.join())
    assert row.acked == row.sent


def _kill_node_mid_association(rig: Rig, node: NodeProcess, big: Path) -> None:
    """Start a large C-STORE, SIGKILL the node while its file is half written."""
    incoming = rig.data_dir / "spool" / "incoming"
    sender = threading.Thread(target=send, args=(big, node.port), daemon=True)
    sender.start()
    wait_for(lambda: any(incoming.iterdir()), 30, interval=0.01, what="a transfer under way")
    node.kill()
    sender.join(60)
    assert any(incoming.iterdir()), "the half-written file is there before the restart"


@pytest.mark.parametrize("mode", ["distributed", "embedded"])
def test_node_killed_mid_association(rig_for, mode: str) -> None:
    # Small PDUs make the large transfer last long enough to be cut in the middle.
    rig = rig_for(embedded=mode == "embedded", env={"SPINENODE_MAX_PDU": "16384"})
    node = rig.node() if mode == "embedded" else rig.node("--no-worker")
    if mode == "distributed":
        rig.worker()
    big = make_radiograph(rig.tmp_path / "big.dcm", rows=3000, columns=3000, seed=99)
    modality = rig.stream()
    time.sleep(3)
    _kill_node_mid_association(rig, node, big)
    time.sleep(DOWN["node"])
    node = rig.node() if mode == "embedded" else rig.node("--no-worker")
    sent = modality.join()
    after = rig.images(IMAGES + 3)[-3:]  # the modality's next images, to the node back up
    sent += [Sent(path, str(dcmread(path).SOPInstanceUID), send(path, node.port))
             for path in after]
    row = settle_and_check(rig, f"node SIGKILL mid-association, back after {DOWN['node']} s "
                                f"({mode})", sent)
    assert row.no_answer >= 1, "some images met the node down"
    assert [item.status for item in sent[-3:]] == [0, 0, 0], "the restarted node takes images"
