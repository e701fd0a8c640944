"""Log lines for machines: ``SPINENODE_LOG_FORMAT=json`` writes one JSON object per line, with
the ids a log search wants (instance, SOP instance, study, delivery, Celery task) as fields.

What the node logs names instances by database id and DICOM UIDs, never by patient name or ID
(a test sends an image with a recognisable patient and searches every log line for it).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

# Attributes a log call may attach with ``extra={...}`` (or a filter may set), copied as fields.
FIELDS = ("instance_id", "sop_instance_uid", "study_uid", "delivery_id", "task_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({field: getattr(record, field) for field in FIELDS
                      if getattr(record, field, None) is not None})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
