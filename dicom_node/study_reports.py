"""Study reports: once a study has been quiet for ``study_stable_seconds`` (the stable-study
timer of Orthanc and mercure), one SR for all its analysed images, sent like any result.

A study is reported when every image of it that the node took is finished and none arrived for
that long. An image that arrives later makes a new version of the report in the same series,
which names the one it supersedes; the older stays, in the PACS and in ``study_reports``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import ColumnElement, Select, case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from dicom_node.analysis import AnalysisResult, Classification, FindingBox
from dicom_node.config import ResultKind, Settings
from dicom_node.db.models import (
    Analysis,
    Delivery,
    Instance,
    InstanceStatus,
    Output,
    Series,
    Study,
    StudyReport,
    utcnow,
)
from dicom_node.outbox import destinations_for
from dicom_node.periodic import Periodic
from dicom_node.results.common import save_object
from dicom_node.results.identity import result_series_uid
from dicom_node.results.sr import build_sr

log = logging.getLogger(__name__)

# An image in one of these has not had its say yet: its study waits for it.
IN_FLIGHT = (InstanceStatus.RECEIVED, InstanceStatus.QUEUED, InstanceStatus.PROCESSING,
             InstanceStatus.WAITING_FOR_MODEL)

EnqueueDelivery = Callable[[int], None]


def studies_to_report(sessions: sessionmaker[Session], stable_seconds: float,
                      changed_since: datetime | None = None) -> list[int]:
    """Studies quiet for ``stable_seconds`` with every image finished and an analysis that their
    latest report (if any) does not include; with ``changed_since``, only among studies with an
    image whose status changed since then (one index range instead of the whole history: on a
    million images the whole took 7 s). Two set queries, not a load per study."""
    quiet_since = utcnow() - timedelta(seconds=stable_seconds)
    quiet = (select(Study.id)
             .join(Series, Series.study_pk == Study.id)
             .join(Instance, Instance.series_pk == Series.id)
             .group_by(Study.id)
             .having(func.max(Instance.received_at) < quiet_since)
             .having(func.sum(case((Instance.status.in_(IN_FLIGHT), 1), else_=0)) == 0))
    if changed_since is not None:
        quiet = quiet.where(Study.id.in_(
            select(Series.study_pk).join(Instance, Instance.series_pk == Series.id)
            .where(Instance.updated_at >= changed_since)))
    with sessions() as session:
        analysed: dict[int, list[int]] = {}
        for study, analysis_id in session.execute(
                _latest_analysis_ids(Series.study_pk.in_(quiet))):
            analysed.setdefault(study, []).append(analysis_id)
        reported = dict(session.execute(  # by version: each study's latest comes last
            select(StudyReport.study_pk, StudyReport.analysis_ids)
            .where(StudyReport.study_pk.in_(quiet)).order_by(StudyReport.version)).all())
    return [study for study, ids in sorted(analysed.items())
            if reported.get(study) != sorted(ids)]


def _latest_analysis_ids(*conditions: ColumnElement[bool]) -> Select:
    """(study, analysis id) of each finished image's latest analysis."""
    return (select(Series.study_pk, func.max(Analysis.id).label("analysis_id"))
            .join(Instance, Analysis.instance_pk == Instance.id)
            .join(Series, Instance.series_pk == Series.id)
            .where(Instance.status == InstanceStatus.DONE, *conditions)
            .group_by(Series.study_pk, Analysis.instance_pk))


def _latest_analyses(session: Session, study_pk: int) -> list[Analysis]:
    """Each finished image's latest analysis, in the order the images arrived."""
    latest = _latest_analysis_ids(Series.study_pk == study_pk).subquery()
    return list(session.scalars(
        select(Analysis).where(Analysis.id.in_(select(latest.c.analysis_id)))
        .options(selectinload(Analysis.findings), selectinload(Analysis.instance))
        .order_by(Analysis.instance_pk)))


def _latest_report(session: Session, study_pk: int) -> StudyReport | None:
    return session.scalars(select(StudyReport).where(StudyReport.study_pk == study_pk)
                           .order_by(StudyReport.version.desc()).limit(1)).first()


def result_of(analysis: Analysis) -> AnalysisResult:
    """An analysis as the result objects show it, from the database."""
    classification = Classification(
        member_probabilities=dict(analysis.member_probabilities), view_probabilities={},
        probability=analysis.probability, threshold=analysis.threshold,
        abnormal=analysis.label == "abnormal")
    boxes = [FindingBox(f.class_name, f.score, f.x0, f.y0, f.x1, f.y1, f.class_index)
             for f in analysis.findings]
    return AnalysisResult(analysis.bundle_name, analysis.bundle_version, analysis.clinical_use,
                          classification, boxes)


def report_study(settings: Settings, sessions: sessionmaker[Session], study_pk: int
                 ) -> list[int]:
    """Write the study's next report (SR file, report row, output, deliveries) unless its latest
    already covers the same analyses; returns the deliveries to queue."""
    with sessions() as session:
        analyses = _latest_analyses(session, study_pk)
        latest = _latest_report(session, study_pk)
        covered = sorted(analysis.id for analysis in analyses)
        if not analyses or (latest is not None and latest.analysis_ids == covered):
            return []
        study_uid = session.get(Study, study_pk).study_uid
        images = [(dcmread(analysis.instance.spool_path, stop_before_pixels=True),
                   result_of(analysis)) for analysis in analyses]
        calling_aes = {analysis.instance.calling_ae for analysis in analyses}
        version = 1 if latest is None else latest.version + 1
        previous = None if latest is None else _sr_of(latest)
        top = max(analyses, key=lambda analysis: analysis.probability)
        report = StudyReport(
            study_pk=study_pk, version=version,
            label="abnormal" if any(a.label == "abnormal" for a in analyses) else "normal",
            probability=top.probability, top_instance_pk=top.instance_pk,
            image_count=len(analyses), finding_count=sum(len(a.findings) for a in analyses),
            analysis_ids=covered)
    sr = build_sr(images, series_uid=result_series_uid(study_uid, ResultKind.SR),
                  instance_number=version,
                  previous=dcmread(previous, stop_before_pixels=True) if previous else None)
    path = save_object(settings.data_dir, sr)
    destinations = {str(d): d for ae in sorted(calling_aes)
                    for d in destinations_for(settings, ae) if ResultKind.SR in d.kinds}
    try:
        with sessions.begin() as session:
            session.add(report)
            output = Output(study_report=report, kind=ResultKind.SR,
                            sop_class_uid=str(sr.SOPClassUID),
                            sop_instance_uid=str(sr.SOPInstanceUID),
                            transfer_syntax_uid=str(sr.file_meta.TransferSyntaxUID),
                            path=str(path))
            deliveries = [Delivery(output=output, destination=name) for name in destinations]
            session.add_all([output, *deliveries])
            session.flush()
            delivery_ids = [delivery.id for delivery in deliveries]
    except IntegrityError:  # another reporter wrote this version first
        path.unlink(missing_ok=True)
        return []
    log.info("study %s reported (version %d): %s, highest p=%.3f, %d images, %d findings",
             study_uid, version, report.label, report.probability, report.image_count,
             report.finding_count)
    return delivery_ids


def _sr_of(report: StudyReport) -> Path | None:
    paths = [Path(output.path) for output in report.outputs if output.kind == ResultKind.SR]
    return paths[0] if paths and paths[0].is_file() else None


# How far before the last round a change is looked for again: workers on other hosts stamp
# updated_at with their own clocks.
CLOCK_MARGIN = timedelta(minutes=5)


class StudyReporter:
    """Checks for stable studies every fifth of the stable time (at least once a second) and
    reports them; the reports' deliveries go to the queue. The first round looks at every study
    (what became ready while the node was down); each later one only at studies with an image
    that changed since the round before began, less the stable time and CLOCK_MARGIN: a study
    becomes ready at most the stable time after its last image changed."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 enqueue_delivery: EnqueueDelivery):
        self._settings = settings
        self._sessions = sessions
        self._enqueue_delivery = enqueue_delivery
        self._thread = Periodic("study reports", max(1.0, settings.study_stable_seconds / 5),
                                self.run_once)
        self._changed_since: datetime | None = None
        self.start, self.stop = self._thread.start, self._thread.stop

    def run_once(self) -> int:
        """Report every stable study now; the number reported."""
        reported = 0
        began = utcnow()
        stable = self._settings.study_stable_seconds
        for study in studies_to_report(self._sessions, stable, self._changed_since):
            delivery_ids = report_study(self._settings, self._sessions, study)
            reported += 1
            for delivery_id in delivery_ids:  # the reconciler sends any this misses
                try:
                    self._enqueue_delivery(delivery_id)
                except Exception as error:
                    log.warning("could not queue delivery %d: %s", delivery_id, error)
        # Only after a round that got through: after one that raised, the next looks as
        # far back again.
        self._changed_since = began - timedelta(seconds=stable) - CLOCK_MARGIN
        return reported
