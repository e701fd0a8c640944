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
    # A task whose worker died is given out again only after this long (Redis keeps it unacked).
    visibility = settings.task_lease_seconds + 60
    common = dict(
        task_default_queue=QUEUE,
        task_acks_late=True,  # ack after the work is done: a dying worker loses nothing
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_time_limit=settings.task_lease_seconds,
        task_soft_time_limit=max(1, settings.task_lease_seconds - 10),
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
    """Messages waiting in the broker (not counting one a worker holds)."""
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        return channel.queue_declare(QUEUE, passive=True).message_count
