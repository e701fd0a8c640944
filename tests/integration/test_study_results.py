"""Results per study, as a PACS shows them: a two-view study stored into Orthanc (which routes it
to the node) gets one SR for both views and one SC series holding both overlays; a view that
comes later makes a second SR version in the same series, naming the first."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.db.models import StudyReport
from dicom_node.db.session import session_factory
from dicom_node.results.identity import result_series_uid
from tests.support.node import free_port, storescu, wait_for
from tests.support.orthanc import Orthanc
from training.synthetic import make_radiograph


def _series(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    """Series UID -> its instances' tags, for the study in Orthanc."""
    found: dict[str, list[dict]] = {}
    for instance in orthanc.study_instances(study_uid):
        tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
        found.setdefault(tags["SeriesInstanceUID"], []).append(tags)
    return found


def _file(orthanc: Orthanc, tags: dict, folder: Path) -> Path:
    """Our object as Orthanc keeps it."""
    import urllib.request

    (found,) = [i for i in orthanc.study_instances(tags["StudyInstanceUID"])
                if i["MainDicomTags"]["SOPInstanceUID"] == tags["SOPInstanceUID"]]
    path = folder / f"{tags['SOPInstanceUID']}.dcm"
    with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}/instances/"
                                f"{found['ID']}/file", timeout=10) as response:
        path.write_bytes(response.read())
    return path


def test_a_study_gets_one_report_and_one_series_per_kind(tmp_path: Path, sqlite_url: str,
                                                         test_bundle: Path, start_node) -> None:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port)
    try:
        start_node(sqlite_url, port=node_port, env={
            "SPINENODE_BUNDLE": str(test_bundle),
            "SPINENODE_DESTINATIONS": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}/sr+sc"})
        study = generate_uid()
        views = [make_radiograph(tmp_path / f"view{i}.dcm", study_uid=study, seed=i)
                 for i in range(3)]
        sr_series, sc_series = result_series_uid(study, "sr"), result_series_uid(study, "sc")

        def results(sr_count: int, sc_count: int) -> dict[str, list[dict]] | None:
            found = _series(orthanc, study)
            done = (len(found.get(sr_series, [])) == sr_count
                    and len(found.get(sc_series, [])) == sc_count)
            return found if done else None

        assert storescu(orthanc.dicom_port, views[:2], called_ae="ORTHANC").returncode == 0
        found = wait_for(lambda: results(1, 2), 180, interval=1,
                         what="one SR and two SCs in their series")
        assert len(found) == 4  # two views, one SR series, one SC series
        (first,) = found[sr_series]
        first_sr = dcmread(_file(orthanc, first, tmp_path))
        evidence = {item.ReferencedSOPInstanceUID
                    for study_item in first_sr.CurrentRequestedProcedureEvidenceSequence
                    for series in study_item.ReferencedSeriesSequence
                    for item in series.ReferencedSOPSequence}
        assert evidence == {str(dcmread(v, stop_before_pixels=True).SOPInstanceUID)
                            for v in views[:2]}
        numbers = [int(tags["InstanceNumber"]) for tags in found[sc_series]]
        assert len(set(numbers)) == len(numbers)  # one series, an instance per view

        assert storescu(orthanc.dicom_port, views[2:], called_ae="ORTHANC").returncode == 0
        found = wait_for(lambda: results(2, 3), 180, interval=1,
                         what="a second SR version and a third SC")
        (second,) = [tags for tags in found[sr_series]
                     if tags["SOPInstanceUID"] != first["SOPInstanceUID"]]
        second_sr = dcmread(_file(orthanc, second, tmp_path))
        assert second_sr.InstanceNumber == 2
        predecessor = second_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            first_sr.SOPInstanceUID
        with session_factory(sqlite_url)() as session:
            reports = session.scalars(select(StudyReport).order_by(StudyReport.version)).all()
            assert [(r.version, r.image_count) for r in reports] == [(1, 2), (2, 3)]
    finally:
        orthanc.stop()
