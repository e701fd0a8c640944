"""The queue between the node and the workers (Celery), and the two tasks on it.

The node builds a ``TaskQueue`` from its settings to send work and to read the queue depth;
that is cheap (no torch, no models). A worker process builds its app with ``worker_app``: the
tasks bound once to that process's pipeline. Nothing here is process-wide state: each
``TaskQueue`` is its own Celery app with its own connections.

A task that cannot reach the database does not vanish: it is sent again with backoff (the
message is acknowledged only once the retry is in the broker). Should the broker be gone too,
the instance's row still says ``queued`` and the node's reconciler sends it again.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import setup_logging, worker_ready, worker_shutdown
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import Settings
from dicom_node.db.leases import is_unavailable

ANALYZE_TASK = "workers.tasks.analyze"
DELIVER_TASK = "workers.tasks.deliver"
QUEUE = "spinenode"
BROKER_CONNECT_SECONDS = 4.0  # Celery's own default for RabbitMQ, given to Redis too

# Backoff of a task that met an unreachable database: 1, 2, 4, ... seconds, at most this.
MAX_UNAVAILABLE_BACKOFF_SECONDS = 30


class BrokerUnusable(Exception):
    """The broker answered but will not let us in (wrong password, unknown user or vhost)."""


class TaskQueue:
    """The broker as the node and the workers use it, configured from the settings."""

    def __init__(self, settings: Settings):
        self.app = Celery("spinenode", set_as_current=False)
        self.app.conf.update(_celery_settings(settings))

    def enqueue_analysis(self, instance_id: int) -> None:
        self.app.send_task(ANALYZE_TASK, args=[instance_id], queue=QUEUE)

    def enqueue_delivery(self, delivery_id: int, countdown: float | None = None) -> None:
        self.app.send_task(DELIVER_TASK, args=[delivery_id], queue=QUEUE, countdown=countdown)

    def depth(self) -> int:
        """Messages waiting in the broker (not counting those a worker holds).

        An empty queue is 0 on every broker: Redis keeps no key for an empty list and forgets
        the queue when it restarts, so the queue is declared (as Celery declares it: same
        options, no harm when it exists) instead of asked for passively, which raises NOT_FOUND
        there.
        """
        with self.app.connection_for_read() as connection:
            queue = self.app.amqp.queues[QUEUE].bind(connection.default_channel)
            return queue.queue_declare().message_count

    def check(self, timeout: float = 5.0) -> str | None:
        """Connect once: raise BrokerUnusable when the broker refuses us; return a one-line
        reason when it cannot be reached (it may come back: the node keeps what it receives
        meanwhile), None when all is well."""
        from amqp.exceptions import AccessRefused, NotAllowed
        from redis.exceptions import AuthenticationError, AuthorizationError

        refusals = (AccessRefused, NotAllowed, AuthenticationError, AuthorizationError)
        connection = self.app.connection_for_write()
        try:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            self.depth()
        except Exception as error:
            cause: BaseException | None = error
            while cause is not None:  # kombu wraps the client's error in its own
                if isinstance(cause, refusals):
                    raise BrokerUnusable(str(cause).splitlines()[0]) from None
                cause = cause.__cause__ or cause.__context__
            return f"{error.__class__.__name__}: {error}".splitlines()[0]
        finally:
            connection.release()
        return None

    def close(self) -> None:
        self.app.close()


def _celery_settings(settings: Settings) -> dict:
    common = dict(
        task_default_queue=QUEUE,
        task_acks_late=True,  # ack after the work is done: a dying worker loses nothing
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_time_limit=settings.task_time_limit_seconds,
        task_soft_time_limit=settings.task_time_limit_seconds - 5,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=BROKER_CONNECT_SECONDS,
        task_serializer="json",
        accept_content=["json"],
    )
    if settings.embedded_broker:
        # Messages are files in the data dir: no server to run. The DB, not the broker, is the
        # record of what is owed; the reconciler re-sends whatever a crash took with it.
        folder = str(settings.queue_dir.resolve())
        return dict(
            broker_url="filesystem://",
            broker_transport="workers.file_broker:Transport",  # messages written whole
            broker_transport_options={
                "data_folder_in": folder,
                "data_folder_out": folder,
                # kombu's exchange table; left unset it lands in the current directory.
                "control_folder": str((settings.queue_dir / "control").resolve()),
                "polling_interval": 0.2,
            },
            worker_enable_remote_control=False,
            **common,
        )
    # Redis hands an unacknowledged message out again after this long: longer than any task, so
    # a running task is not delivered twice (the claim would refuse the copy anyway).
    visibility = settings.task_time_limit_seconds + 60
    # Celery's broker_connection_timeout bounds connecting to RabbitMQ, not to Redis: there the
    # kernel's retries held a send 134 s where the host dropped packets (the dispatcher's, and
    # a worker's of the next task); the reconciler's look at the queue's depth connects too.
    return dict(broker_url=settings.broker_url,
                broker_transport_options={"visibility_timeout": visibility,
                                          "socket_connect_timeout": BROKER_CONNECT_SECONDS},
                **common)


def worker_app(settings: Settings) -> Celery:
    """A worker process's Celery app: the analysis and delivery tasks, bound to one pipeline."""
    from dicom_node.db.session import session_factory
    from dicom_node.heartbeat import Heartbeat
    from dicom_node.outbox import deliver as deliver_one
    from workers.bundle import load_bundle
    from workers.pipeline import RETRY_DELAY_SECONDS, Pipeline

    queue = TaskQueue(settings)
    sessions = session_factory(settings.effective_database_url)
    pipeline = Pipeline(settings, sessions, queue.enqueue_delivery)
    # The heartbeat names the bundle this worker serves; `spinenode worker` verified its
    # checksums before it got here.
    bundle = (load_bundle(settings.bundle, verify_checksums=False).label
              if settings.bundle else "")
    heartbeat = Heartbeat(sessions, settings.worker_heartbeat_seconds, bundle)
    worker_ready.connect(lambda **_: heartbeat.start(), weak=False)
    worker_shutdown.connect(lambda **_: heartbeat.stop(), weak=False)
    for handler in logging.getLogger().handlers:  # every line a task logs carries its id
        handler.addFilter(_with_task_id)
        # billiard (Celery's process pool) logs with propagation off: give it the same handler.
        logging.getLogger("multiprocessing").addHandler(handler)
    # Celery sets up its own log format unless someone answers this signal: the node's
    # logging (text or JSON, configured by the command) stays the only one.
    setup_logging.connect(_keep_the_nodes_logging, weak=False)

    @queue.app.task(name=ANALYZE_TASK, bind=True, max_retries=None)
    def analyze(task, instance_id: int, note: str = "") -> str:  # noqa: ANN001
        try:
            outcome = pipeline.process(instance_id, note)
        except SQLAlchemyError as error:
            raise _retry_unavailable(task, error, instance_id, noted=True) from None
        if outcome.status == "retry":
            raise task.retry(countdown=RETRY_DELAY_SECONDS)
        return outcome.status

    @queue.app.task(name=DELIVER_TASK, bind=True, max_retries=None)
    def deliver(task, delivery_id: int) -> str:  # noqa: ANN001
        try:
            outcome = deliver_one(settings, sessions, delivery_id)
        except SQLAlchemyError as error:
            raise _retry_unavailable(task, error, delivery_id) from None
        if outcome.retry_in is not None:  # the reconciler also sends due deliveries
            queue.enqueue_delivery(delivery_id, countdown=outcome.retry_in)
        return outcome.status

    return queue.app


def _retry_unavailable(task, error: SQLAlchemyError, item_id: int, noted: bool = False):  # noqa: ANN001, ANN202
    """Send the task again later (with a ``note`` of why, where the task records one); errors
    that are not an outage propagate."""
    if not is_unavailable(error):
        raise error
    delay = min(2 ** task.request.retries, MAX_UNAVAILABLE_BACKOFF_SECONDS)
    note = f"database unavailable ({error.__class__.__name__}), retry {task.request.retries + 1}"
    return task.retry(args=[item_id], kwargs={"note": note} if noted else {}, countdown=delay,
                      exc=error)


def _keep_the_nodes_logging(**_: object) -> None:
    pass


def _with_task_id(record: logging.LogRecord) -> bool:
    from celery import current_task

    if current_task and current_task.request.id and not hasattr(record, "task_id"):
        record.task_id = current_task.request.id
    return True
