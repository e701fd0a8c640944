"""Study reports: one SR for a study's images once it is quiet, versioned when more arrive; on
SQLite and PostgreSQL, from images stored by the real intake."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from dicom_node import retention
from dicom_node.config import Settings, load_settings
from dicom_node.db import migrate
from dicom_node.db.models import (
    Analysis,
    Delivery,
    DeliveryStatus,
    Finding,
    Instance,
    InstanceEvent,
    InstanceStatus,
    Output,
    Study,
    StudyReport,
    utcnow,
)
from dicom_node.db.session import session_factory
from dicom_node.intake import Intake
from dicom_node.results.identity import result_series_uid
from dicom_node.study_reports import StudyReporter, report_study, studies_to_report
from training.synthetic import make_radiograph

STABLE = 30.0


def _node(tmp_path: Path, database_url: str) -> Settings:
    settings = load_settings(data_dir=tmp_path / "var", database_url=database_url,
                             study_stable_seconds=STABLE,
                             destinations=["PACS@127.0.0.1:11113/sr+sc", "VNA@127.0.0.1:11114/sc"])
    settings.make_dirs()
    migrate.upgrade(database_url)
    return settings


def _analysed(settings: Settings, study_uid: str, probability: float, label: str,
              boxes: int = 0, age_seconds: float = 60) -> int:
    """An image of the study stored by the intake and analysed (as a worker records it)."""
    sessions = session_factory(settings.effective_database_url)
    path = make_radiograph(settings.data_dir / "in" / f"{generate_uid()}.dcm", rows=300,
                           columns=200, study_uid=study_uid)
    ds = dcmread(path, stop_before_pixels=True)
    incoming = settings.incoming_dir / path.name
    shutil.copy(path, incoming)
    instance_id = Intake(settings, sessions).store(
        incoming, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
        calling_ae="MODALITY", called_ae="SPINENODE").instance_id
    with sessions.begin() as session:
        instance = session.get(Instance, instance_id)
        instance.status = InstanceStatus.DONE
        instance.received_at = utcnow() - timedelta(seconds=age_seconds)
        analysis = Analysis(
            instance=instance, source_sha256=instance.sha256, bundle_name="spinenode-test",
            bundle_version="1", clinical_use=False,
            member_probabilities={"densenet121": probability}, probability=probability,
            threshold=0.5, label=label, decode_seconds=0, classify_seconds=0, detect_seconds=0,
            device="cpu float32")
        session.add(analysis)
        session.add_all(Finding(analysis=analysis, class_index=0, class_name="Osteophytes",
                                score=0.7, x0=10 + 20 * i, y0=20, x1=30 + 20 * i, y1=60)
                        for i in range(boxes))
    return instance_id


def test_a_quiet_study_gets_one_report_of_all_its_images(tmp_path: Path,
                                                         database_url: str) -> None:
    settings = _node(tmp_path, database_url)
    sessions = session_factory(database_url)
    study_uid = generate_uid()
    normal = _analysed(settings, study_uid, 0.2, "normal")
    abnormal = _analysed(settings, study_uid, 0.9, "abnormal", boxes=2)
    ((study_pk,),) = [studies_to_report(sessions, STABLE)]
    assert report_study(settings, sessions, study_pk)  # deliveries to queue
    with sessions() as session:
        (report,) = session.scalars(select(StudyReport)).all()
        assert (report.version, report.label, report.probability, report.top_instance_pk,
                report.image_count, report.finding_count) == (1, "abnormal", 0.9, abnormal,
                                                              2, 2)
        (output,) = report.outputs
        # Only the destination that takes SRs gets the study's SR.
        assert [d.destination for d in output.deliveries] == ["PACS@127.0.0.1:11113"]
    sr = dcmread(output.path)
    assert sr.SeriesInstanceUID == result_series_uid(study_uid, "sr")
    assert sr.StudyInstanceUID == study_uid and sr.InstanceNumber == 1
    library = next(item for item in sr.ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeMeaning == "Image Library")
    referenced = [entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for entry in library.ContentSequence[0].ContentSequence]
    with sessions() as session:
        uids = [session.get(Instance, pk).sop_instance_uid for pk in (normal, abnormal)]
    assert referenced == uids
    errors = subprocess.run(["dciodvfy", output.path], capture_output=True, text=True)
    assert [line for line in (errors.stdout + errors.stderr).splitlines()
            if line.startswith("Error")] == []
    # Nothing new: no second report.
    assert studies_to_report(sessions, STABLE) == []
    assert report_study(settings, sessions, study_pk) == []


def test_a_study_waits_until_quiet_and_finished(tmp_path: Path, sqlite_url: str) -> None:
    settings = _node(tmp_path, sqlite_url)
    sessions = session_factory(sqlite_url)
    recent = generate_uid()
    _analysed(settings, recent, 0.3, "normal", age_seconds=5)  # arrived 5 s ago
    busy = generate_uid()
    _analysed(settings, busy, 0.3, "normal")
    still_working = _analysed(settings, busy, 0.3, "normal")
    with sessions.begin() as session:
        session.execute(update(Instance).where(Instance.id == still_working)
                        .values(status=InstanceStatus.PROCESSING))
    assert studies_to_report(sessions, STABLE) == []
    assert len(studies_to_report(sessions, 4)) == 1  # the recent one, with a shorter timer


def test_a_later_image_makes_a_new_version_that_supersedes_the_first(
        tmp_path: Path, sqlite_url: str) -> None:
    settings = _node(tmp_path, sqlite_url)
    sessions = session_factory(sqlite_url)
    queued: list[int] = []
    reporter = StudyReporter(settings, sessions, queued.append)
    study_uid = generate_uid()
    _analysed(settings, study_uid, 0.2, "normal")
    assert reporter.run_once() == 1
    _analysed(settings, study_uid, 0.4, "normal")
    assert reporter.run_once() == 1
    assert reporter.run_once() == 0
    with sessions() as session:
        first, second = session.scalars(select(StudyReport).order_by(StudyReport.version))
        assert (first.version, first.image_count, second.version, second.image_count) == \
            (1, 1, 2, 2)
        old, new = (dcmread(report.outputs[0].path) for report in (first, second))
        delivered = session.scalars(select(Delivery.id).join(Output)).all()
    assert sorted(queued) == sorted(delivered) and len(queued) == 2
    assert new.SeriesInstanceUID == old.SeriesInstanceUID and new.InstanceNumber == 2
    (predecessor,) = new.PredecessorDocumentsSequence
    referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert Path(first.outputs[0].path).is_file()  # the first version stays


def test_retention_strips_a_delivered_report_and_a_later_version_still_names_it(
        tmp_path: Path, database_url: str) -> None:
    settings = _node(tmp_path, database_url).model_copy(
        update={"outputs_retention_days": 1 / 86400})  # one second after delivery
    sessions = session_factory(database_url)
    reporter = StudyReporter(settings, sessions, lambda _: None)
    study_uid = generate_uid()
    _analysed(settings, study_uid, 0.8, "abnormal", boxes=1)
    assert reporter.run_once() == 1
    with sessions.begin() as session:  # the PACS has the first version
        (first,) = session.scalars(select(StudyReport)).all()
        first_path, first_uid = first.outputs[0].path, first.outputs[0].sop_instance_uid
        for delivery in first.outputs[0].deliveries:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = utcnow() - timedelta(seconds=5)
        first.outputs[0].created_at = utcnow() - timedelta(seconds=5)
    assert [p.path for p in retention.purge(settings, sessions)] == [first_path]
    stripped = dcmread(first_path)
    assert "ContentSequence" not in stripped and stripped.SOPInstanceUID == first_uid

    # A later image: the new version names the stripped one as its predecessor, and, its own
    # delivery still pending, is kept however old it gets.
    _analysed(settings, study_uid, 0.3, "normal")
    assert reporter.run_once() == 1
    with sessions.begin() as session:
        second = session.scalars(select(StudyReport).where(StudyReport.version == 2)).one()
        second_path = second.outputs[0].path
        second.outputs[0].created_at = utcnow() - timedelta(days=1)
        events = session.scalars(select(InstanceEvent.detail)
                                 .where(InstanceEvent.event == "purged")).all()
    (predecessor,) = dcmread(second_path).PredecessorDocumentsSequence
    assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == first_uid
    assert retention.due(settings, sessions) == []
    assert "ContentSequence" in dcmread(second_path)
    assert [e.split(" (")[0] for e in events] == ["report content removed"]


def test_after_its_first_round_the_reporter_looks_only_at_changed_studies(
        tmp_path: Path, database_url: str) -> None:
    """The first round finds every stable study (also one that became stable while the node
    was down); later rounds only those with an image changed since the round before (less the
    stable time and a clock margin), which is every study that can have become ready since."""
    settings = _node(tmp_path, database_url)
    sessions = session_factory(database_url)
    reporter = StudyReporter(settings, sessions, lambda _: None)
    day_ago = utcnow() - timedelta(days=1)

    def analysed_long_ago() -> int:
        instance_id = _analysed(settings, generate_uid(), 0.3, "normal")
        with sessions.begin() as session:
            session.get(Instance, instance_id).updated_at = day_ago
        return instance_id

    analysed_long_ago()  # finished yesterday, while no reporter ran
    assert studies_to_report(sessions, STABLE, changed_since=utcnow() - timedelta(hours=1)) == []
    assert reporter.run_once() == 1  # the first round looks at everything
    recent = generate_uid()
    _analysed(settings, recent, 0.4, "normal")  # finished now: changed since the last round
    analysed_long_ago()  # cannot happen after a first round; here it shows what is looked at
    assert reporter.run_once() == 1
    with sessions() as session:
        reported = session.scalars(select(Study.study_uid).join(StudyReport.study)).all()
    assert recent in reported and len(reported) == 2


def test_retention_purges_at_most_its_limit_a_round(tmp_path: Path, database_url: str) -> None:
    settings = _node(tmp_path, database_url).model_copy(update={"spool_retention_days": 1 / 86400})
    sessions = session_factory(database_url)
    for _ in range(3):
        _analysed(settings, generate_uid(), 0.3, "normal")  # received a minute ago, done
    assert len(retention.due(settings, sessions)) == 3
    assert len(retention.purge(settings, sessions, limit=2)) == 2
    assert len(retention.due(settings, sessions)) == 1  # the next round's
    assert len(retention.purge(settings, sessions, limit=2)) == 1
