"""Celery tasks. Bodies stay thin: the work is in ``workers.pipeline`` and ``dicom_node.outbox``.

A task that cannot reach the database does not vanish: it is sent again with backoff (the
message is acknowledged only once the retry is in the broker). Should the broker be gone too,
the instance's row still says ``queued`` and the node's reconciler sends it again.
"""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.db.leases import is_unavailable
from dicom_node.db.session import session_factory
from dicom_node.outbox import deliver as deliver_one
from workers import pipeline
from workers.app import ANALYZE_TASK, DELIVER_TASK, app, enqueue_delivery, settings

# Backoff of a task that met an unreachable database: 1, 2, 4, ... seconds, at most this.
MAX_UNAVAILABLE_BACKOFF_SECONDS = 30


def _retry_unavailable(task, error: SQLAlchemyError, item_id: int, noted: bool = False):  # noqa: ANN001, ANN202
    """Send the task again later (with a ``note`` of why, where the task records one); errors
    that are not an outage propagate."""
    if not is_unavailable(error):
        raise error
    delay = min(2 ** task.request.retries, MAX_UNAVAILABLE_BACKOFF_SECONDS)
    note = f"database unavailable ({error.__class__.__name__}), retry {task.request.retries + 1}"
    return task.retry(args=[item_id], kwargs={"note": note} if noted else {}, countdown=delay,
                      exc=error)


@app.task(name=ANALYZE_TASK, bind=True, max_retries=None)
def analyze(self, instance_id: int, note: str = "") -> str:  # noqa: ANN001
    config = settings()
    try:
        outcome = pipeline.process_instance(
            config, session_factory(config.effective_database_url), instance_id, note)
    except SQLAlchemyError as error:
        raise _retry_unavailable(self, error, instance_id, noted=True) from None
    if outcome.status == "retry":
        raise self.retry(countdown=pipeline.RETRY_DELAY_SECONDS)
    return outcome.status


@app.task(name=DELIVER_TASK, bind=True, max_retries=None)
def deliver(self, delivery_id: int) -> str:  # noqa: ANN001
    config = settings()
    try:
        outcome = deliver_one(config, session_factory(config.effective_database_url),
                              delivery_id)
    except SQLAlchemyError as error:
        raise _retry_unavailable(self, error, delivery_id) from None
    if outcome.retry_in is not None:  # the reconciler also sends due deliveries
        enqueue_delivery(delivery_id, countdown=outcome.retry_in)
    return outcome.status
