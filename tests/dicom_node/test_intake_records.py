"""The rows the intake finds or makes for an image's patient, study and series, and what that
costs in statements: each is a round trip that holds up the sender's next C-STORE."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import event, func, make_url, select, text
from sqlalchemy.exc import OperationalError

from dicom_node.config import Settings, load_settings
from dicom_node.db import migrate
from dicom_node.db import session as session_module
from dicom_node.db.models import Instance, Patient, Series, Study
from dicom_node.db.session import engine_for, session_factory
from dicom_node.intake import Intake, StoreOutcome, StoreStatus, spool_path_for
from tests.support.fault_peers import CuttableLink, dropping_connections
from training.synthetic import make_radiograph

_HIERARCHY = re.compile(r"\b(patients|studies|series)\b")


def _node(tmp_path: Path, database_url: str) -> tuple[Settings, Intake]:
    settings = load_settings(data_dir=tmp_path / "var", database_url=database_url)
    settings.make_dirs()
    migrate.upgrade(database_url)
    return settings, Intake(settings, session_factory(database_url))


def _store(settings: Settings, intake: Intake, study_uid: str | None = None,
           series_uid: str | None = None) -> StoreOutcome:
    path = make_radiograph(settings.incoming_dir / f"{generate_uid()}.dcm", rows=64, columns=48,
                           study_uid=study_uid)
    ds = dcmread(path)
    if series_uid:
        ds.SeriesInstanceUID = series_uid
        ds.save_as(path)
    return intake.store(path, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                        calling_ae="MODALITY", called_ae="SPINENODE")


def _statements(database_url: str, store) -> list[str]:  # noqa: ANN001
    """The SQL statements that ``store()`` sent."""
    sent: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:  # noqa: ANN001
        sent.append(statement)

    engine = engine_for(database_url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        assert store().status == StoreStatus.SUCCESS
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return sent


def _wait_until_blocked(intake: Intake, sender: threading.Thread) -> None:
    """Until the sender's transaction waits for a lock that the other one holds (PostgreSQL)."""
    def blocked() -> bool:
        assert sender.is_alive(), "the sender finished without waiting for the other transaction"
        with intake.sessions() as session:
            return bool(session.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()")))
    deadline = time.monotonic() + 30
    while not blocked():
        assert time.monotonic() < deadline, "the sender never waited for the other transaction"
        time.sleep(0.05)


def test_an_image_of_a_known_series_reads_only_the_series_row(tmp_path: Path,
                                                              database_url: str) -> None:
    settings, intake = _node(tmp_path, database_url)
    first = _store(settings, intake)
    with intake.sessions() as session:
        series_uid = session.scalar(select(Series.series_uid))
        study_uid = session.scalar(select(Study.study_uid))

    known = _statements(database_url, lambda: _store(settings, intake, study_uid, series_uid))
    touching = [s for s in known if _HIERARCHY.search(s)]
    assert len(touching) == 1 and touching[0].lstrip().upper().startswith("SELECT")
    assert not [s for s in known if "SAVEPOINT" in s.upper()]

    # A new series of that study: the series is inserted, the study found, the patient not read.
    new_series = _statements(database_url, lambda: _store(settings, intake, study_uid))
    assert [s.split()[0].upper() for s in new_series if re.search(r"\bpatients\b", s)] == []
    assert [s.split()[0].upper() for s in new_series if _HIERARCHY.search(s)] == [
        "SELECT", "SELECT", "INSERT"]

    with intake.sessions() as session:
        assert session.scalar(select(func.count(Patient.id))) == 1
        assert session.scalar(select(func.count(Study.id))) == 1
        assert session.scalar(select(func.count(Series.id))) == 2
        assert session.get(Instance, first.instance_id).series.series_uid == series_uid


def test_two_senders_of_one_new_study_share_its_rows(tmp_path: Path, postgres_url: str) -> None:
    """The other sender's transaction holds the new patient, study and series, not yet
    committed: this image's insert waits for it and then takes its rows, with no error."""
    settings, intake = _node(tmp_path, postgres_url)
    study_uid, series_uid = generate_uid(), generate_uid()
    other = intake.sessions()
    other.begin()
    patient = Patient(patient_id="TEST-0001", issuer="")
    series = Series(series_uid=series_uid, study=Study(study_uid=study_uid, patient=patient))
    other.add(series)
    other.flush()

    outcome: list[StoreOutcome] = []
    sender = threading.Thread(target=lambda: outcome.append(
        _store(settings, intake, study_uid, series_uid)))
    sender.start()
    _wait_until_blocked(intake, sender)
    other.commit()
    sender.join(30)

    assert outcome and outcome[0].status == StoreStatus.SUCCESS
    with intake.sessions() as session:
        instance = session.get(Instance, outcome[0].instance_id)
        assert instance.series_pk == series.id
        assert session.scalar(select(func.count(Patient.id))) == 1
        assert session.scalar(select(func.count(Study.id))) == 1
        assert session.scalar(select(func.count(Series.id))) == 1
    other.close()


@pytest.mark.parametrize("same_bytes", [True, False])
def test_an_instance_recorded_meanwhile_by_another_sender(tmp_path: Path, postgres_url: str,
                                                          same_bytes: bool) -> None:
    """Another association records the same SOP Instance UID while this one stores it (its
    insert waits on the unique UID, then fails): the sender gets success, as a duplicate or as
    a revision, and the file that the other's row names stays."""
    settings, intake = _node(tmp_path, postgres_url)
    path = make_radiograph(settings.incoming_dir / "ours.dcm", rows=64, columns=48)
    ds = dcmread(path)
    ours = path.read_bytes()
    theirs = ours if same_bytes else ours + b"\0\0"
    digest = hashlib.sha256(theirs).hexdigest()
    their_file = spool_path_for(settings.spool_dir, ds.SOPInstanceUID, digest)
    their_file.parent.mkdir(parents=True)
    their_file.write_bytes(theirs)
    other = intake.sessions()
    other.begin()
    series = Series(series_uid=ds.SeriesInstanceUID, study=Study(
        study_uid=ds.StudyInstanceUID, patient=Patient(patient_id=ds.PatientID, issuer="")))
    other.add(Instance(sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                       series=series, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                       size_bytes=len(theirs), sha256=digest, spool_path=str(their_file)))
    other.flush()

    outcome: list[StoreOutcome] = []
    sender = threading.Thread(target=lambda: outcome.append(intake.store(
        path, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
        calling_ae="MODALITY", called_ae="SPINENODE")))
    sender.start()
    _wait_until_blocked(intake, sender)
    other.commit()
    sender.join(30)

    assert outcome and outcome[0].status == StoreStatus.SUCCESS, outcome
    assert outcome[0].message == ("duplicate" if same_bytes else "stored")
    assert their_file.read_bytes() == theirs
    with intake.sessions() as session:
        (row,) = session.scalars(select(Instance)).all()
        assert row.revision == (1 if same_bytes else 2)
        assert Path(row.spool_path).read_bytes() == ours
    other.close()


def test_a_file_that_could_not_be_recorded_goes_unless_a_row_names_it(tmp_path: Path) -> None:
    """After a failed record, the file moved into the spool is removed, unless another
    association's row (same UID and bytes, hence the same path) names it."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    settings, intake = _node(tmp_path, url)
    outcome = _store(settings, intake)
    with intake.sessions() as session:
        named = Path(session.get(Instance, outcome.instance_id).spool_path)
    stray = named.with_name("stray.dcm")
    stray.write_bytes(named.read_bytes())
    intake._remove_unless_recorded(named)
    intake._remove_unless_recorded(stray)
    assert named.exists() and not stray.exists()


def test_a_database_that_drops_connections_costs_seconds(tmp_path: Path) -> None:
    # A PostgreSQL host behind a firewall that drops packets: the sender hears 0xA700 (retry
    # later) within libpq's connect timeout, not after the kernel's 2 minutes of retrying.
    with dropping_connections() as port:
        url = f"postgresql://spinenode@127.0.0.1:{port}/spinenode"
        settings = load_settings(data_dir=tmp_path / "var", database_url=url)
        settings.make_dirs()
        intake = Intake(settings, session_factory(url))
        began = time.monotonic()
        outcome = _store(settings, intake)
        assert time.monotonic() - began < 20
    assert outcome == StoreOutcome(StoreStatus.OUT_OF_RESOURCES, "database unavailable")


def test_a_connection_cut_mid_query_fails_instead_of_waiting(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The node's PostgreSQL connections give up on data the server does not acknowledge
    # (tcp_user_timeout 20 s, measured 20.4; 2 s here). Without it a query on a cut connection
    # was still waiting after 200 s (measured): TCP retransmits for about 15 minutes.
    monkeypatch.setitem(session_module._POSTGRES_CONNECTION, "tcp_user_timeout", 2000)
    server = make_url(postgres_url)
    link = CuttableLink((server.host or "127.0.0.1", server.port or 5432))
    url = server.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)
    mend = threading.Timer(30, link.mend)  # where the query waits, it ends all the same
    mend.daemon = True
    try:
        with engine_for(url).connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
            link.cut()
            mend.start()
            began = time.monotonic()
            with pytest.raises(OperationalError):
                connection.execute(text("SELECT 2"))
            assert time.monotonic() - began < 20
    finally:
        mend.cancel()
        link.close()
        engine_for(url).dispose()
