"""Celery tasks. Bodies stay thin: the work is in ``workers.pipeline``."""

from __future__ import annotations

from dicom_node.db.session import session_factory
from dicom_node.outbox import deliver as deliver_one
from workers import pipeline
from workers.app import ANALYZE_TASK, DELIVER_TASK, app, enqueue_delivery, settings


@app.task(name=ANALYZE_TASK, bind=True, max_retries=None)
def analyze(self, instance_id: int) -> str:  # noqa: ANN001
    config = settings()
    outcome = pipeline.process_instance(
        config, session_factory(config.effective_database_url), instance_id
    )
    if outcome.status == "retry":
        raise self.retry(countdown=pipeline.RETRY_DELAY_SECONDS)
    return outcome.status


@app.task(name=DELIVER_TASK)
def deliver(delivery_id: int) -> str:
    config = settings()
    outcome = deliver_one(config, session_factory(config.effective_database_url), delivery_id)
    if outcome.retry_in is not None:  # the reconciler also sends due deliveries
        enqueue_delivery(delivery_id, countdown=outcome.retry_in)
    return outcome.status
