"""The Celery app: broker, queue and delivery guarantees, from the node's settings.

Importing this module is cheap (no torch): the node imports it to enqueue and to read the queue
depth. The task bodies live in ``workers.tasks``.
"""

from __future__ import annotations

from celery import Celery

from dicom_node.config import Settings

ANALYZE_TASK = "workers.tasks.analyze"
DELIVER_TASK = "workers.tasks.deliver"
QUEUE = "spinenode"

app = Celery("spinenode", include=["workers.tasks"])
_settings: Settings | None = None


def configure(settings: Settings) -> Celery:
    """Point the app at the settings' broker; call once per process before using it."""
    global _settings
    _settings = settings
    # Configured again (the tests do): drop the pooled connections to the previous broker.
    app.close()
    app.amqp._producer_pool = None
    # Redis hands an unacknowledged message out again after this long: longer than any task, so
    # a running task is not delivered twice (the claim would refuse the copy anyway).
    visibility = settings.task_time_limit_seconds + 60
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
        task_serializer="json",
        accept_content=["json"],
    )
    if settings.embedded_broker:
        # Messages are files in the data dir: no server to run. The DB, not the broker, is the
        # record of what is owed; the reconciler re-sends whatever a crash took with it.
        folder = str(settings.queue_dir.resolve())
        app.conf.update(
            broker_url="filesystem://",
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
    else:
        app.conf.update(
            broker_url=settings.broker_url,
            broker_transport_options={"visibility_timeout": visibility},
            **common,
        )
    return app


def settings() -> Settings:
    if _settings is None:
        raise RuntimeError("workers.app.configure(settings) was not called in this process")
    return _settings


def enqueue_analysis(instance_id: int) -> None:
    app.send_task(ANALYZE_TASK, args=[instance_id], queue=QUEUE)


def enqueue_delivery(delivery_id: int, countdown: float | None = None) -> None:
    app.send_task(DELIVER_TASK, args=[delivery_id], queue=QUEUE, countdown=countdown)


def queue_depth() -> int:
    """Messages waiting in the broker (not counting those a worker holds).

    An empty queue is 0 on every broker: Redis keeps no key for an empty list and forgets the
    queue when it restarts, so the queue is declared (as Celery declares it: same options, no
    harm when it exists) instead of asked for passively, which raises NOT_FOUND there.
    """
    with app.connection_for_read() as connection:
        queue = app.amqp.queues[QUEUE].bind(connection.default_channel)
        return queue.queue_declare().message_count


class BrokerUnusable(Exception):
    """The broker answered but will not let us in (wrong password, unknown user or vhost)."""


def check_broker(timeout: float = 5.0) -> str | None:
    """Connect once: raise BrokerUnusable when the broker refuses us; return a one-line reason
    when it cannot be reached (it may come back: the node keeps what it receives meanwhile),
    None when all is well."""
    from amqp.exceptions import AccessRefused, NotAllowed
    from redis.exceptions import AuthenticationError, AuthorizationError

    refusals = (AccessRefused, NotAllowed, AuthenticationError, AuthorizationError)
    connection = app.connection_for_write()
    try:
        connection.ensure_connection(max_retries=1, timeout=timeout)
        queue_depth()
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
