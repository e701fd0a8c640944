"""Retention: patient pixel data is kept only as long as the settings say. The spool keeps a
finished image's header (the study report reads it) and loses its pixel data. A result object
we made goes once all its deliveries succeeded: an overlay or presentation state is removed, an
SR keeps its header without its content (a later version of the report names it as its
predecessor). Rows stay: they are the record. Nothing whose analysis or delivery is pending is
touched, and each purge is an event of the image (a study's SR: of its most suspicious image)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import ResultKind, Settings
from dicom_node.db.models import (
    Analysis,
    Delivery,
    DeliveryStatus,
    Instance,
    InstanceEvent,
    InstanceStatus,
    Output,
    StudyReport,
    utcnow,
)
from dicom_node.files import fsync_dir, fsync_file

log = logging.getLogger(__name__)

FINISHED = (InstanceStatus.DONE, InstanceStatus.SKIPPED, InstanceStatus.FAILED)
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class Purge:
    kind: str  # "spool" (pixel data out of a received image) or "output" (a result object)
    instance_id: int  # whose event log says so
    path: str
    size_bytes: int
    why: str
    output_id: int | None = None  # the result object's row, for "output"


def due(settings: Settings, sessions: sessionmaker[Session]) -> list[Purge]:
    """What retention would purge now, oldest first."""
    now = utcnow()
    found: list[Purge] = []
    with sessions() as session:
        kept = select(Instance).where(Instance.status.in_(FINISHED), Instance.purged_at.is_(None))
        if settings.spool_retention_days:
            cutoff = now - timedelta(days=settings.spool_retention_days)
            for instance in session.scalars(kept.where(Instance.received_at < cutoff)
                                            .order_by(Instance.received_at)):
                found.append(Purge("spool", instance.id, instance.spool_path,
                                   instance.size_bytes,
                                   f"older than {settings.spool_retention_days:g} days"))
        if settings.spool_retention_max_mb:
            # Newest first: whatever takes the spool past the limit goes, if it is finished
            # (an image still pending counts towards the total but stays).
            chosen, total = {p.instance_id for p in found}, 0
            limit = settings.spool_retention_max_mb * 2**20
            rows = session.execute(
                select(Instance.id, Instance.spool_path, Instance.size_bytes, Instance.status)
                .where(Instance.purged_at.is_(None)).order_by(Instance.received_at.desc()))
            for instance_id, path, size, status in rows:
                if instance_id in chosen:
                    continue
                total += size
                if total > limit and status in FINISHED:
                    total -= size
                    found.append(Purge("spool", instance_id, path, size,
                                       f"spool over {settings.spool_retention_max_mb:g} MB"))
        found += _outputs_due(session, settings)
    return found


def _outputs_due(session: Session, settings: Settings) -> list[Purge]:
    """Result objects delivered everywhere (or with nowhere to go) that are past their age, or
    that take the outputs past their total size (newest kept first)."""
    found: list[Purge] = []
    unsent = exists().where(Delivery.output_pk == Output.id,
                            Delivery.status != DeliveryStatus.DELIVERED)
    instance_pk = func.coalesce(Analysis.instance_pk, StudyReport.top_instance_pk)
    kept = (select(Output, instance_pk).outerjoin(Output.analysis)
            .outerjoin(Output.study_report).where(Output.purged_at.is_(None)))
    if settings.outputs_retention_days:
        cutoff = utcnow() - timedelta(days=settings.outputs_retention_days)
        late = exists().where(Delivery.output_pk == Output.id, Delivery.delivered_at >= cutoff)
        query = kept.where(Output.created_at < cutoff, ~unsent, ~late).order_by(Output.created_at)
        for output, instance_id in session.execute(query):
            found.append(Purge("output", instance_id, output.path, _size(output.path),
                               f"{output.kind} delivered over "
                               f"{settings.outputs_retention_days:g} days ago", output.id))
    if settings.outputs_retention_max_mb:
        chosen, total = {p.path for p in found}, 0
        limit = settings.outputs_retention_max_mb * 2**20
        query = kept.add_columns(unsent.label("pending")).order_by(Output.created_at.desc())
        for output, instance_id, pending in session.execute(query):
            if output.path in chosen:
                continue
            size = _size(output.path)
            total += size
            if total > limit and not pending:  # one still to deliver counts, but stays
                total -= size
                found.append(Purge("output", instance_id, output.path, size,
                                   f"outputs over {settings.outputs_retention_max_mb:g} MB",
                                   output.id))
    return found


def _size(path: str) -> int:
    return Path(path).stat().st_size if Path(path).exists() else 0


def purge(settings: Settings, sessions: sessionmaker[Session], dry_run: bool = False,
          limit: int | None = None) -> list[Purge]:
    """Purge what is due, at most the first ``limit`` that ``due`` lists (or only list it);
    each purge recorded as an event of its image."""
    done = []
    for item in due(settings, sessions)[:limit]:
        if dry_run:
            done.append(item)
            continue
        with sessions.begin() as session:
            if item.kind == "spool":
                _strip(Path(item.path), PIXEL_KEYWORDS)
                session.get(Instance, item.instance_id).purged_at = utcnow()
                what = "pixel data"
            else:
                output = session.get(Output, item.output_id)
                if output.kind == ResultKind.SR:
                    _strip(Path(item.path), ("ContentSequence",))
                    what = "report content"
                else:
                    Path(item.path).unlink(missing_ok=True)
                    what = f"{output.kind} object"
                output.purged_at = utcnow()
            session.add(InstanceEvent(instance_pk=item.instance_id, event="purged",
                                      detail=f"{what} removed ({item.why}); {item.path}"))
        done.append(item)
    if done and not dry_run:
        log.info("retention purged %d files (%.1f MB)", len(done),
                 sum(p.size_bytes for p in done) / 2**20)
    return done


def _strip(path: Path, keywords: tuple[str, ...]) -> None:
    """Rewrite a file without these elements (atomically, durably); the rest stays."""
    if not path.exists():
        return
    ds = dcmread(path)
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)
    partial = path.with_suffix(".purging")
    ds.save_as(partial, enforce_file_format=False)
    fsync_file(partial)
    os.replace(partial, path)
    fsync_dir(path.parent)

