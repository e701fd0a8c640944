"""Batching: a task claims other queued instances, decodes them in parallel processes and runs
the models once for the lot; results match one-at-a-time analysis."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.config import load_settings
from dicom_node.db import migrate
from dicom_node.db.models import Analysis, Instance
from dicom_node.db.session import session_factory
from dicom_node.intake import Intake, mark_queued
from tests.support.node import storescu, wait_until_settled
from training.synthetic import make_radiograph
from workers.pipeline import Pipeline


def _store(settings, paths: list[Path]) -> list[int]:
    intake = Intake(settings, session_factory(settings.effective_database_url))
    ids = []
    for path in paths:
        incoming = settings.incoming_dir / path.name
        shutil.copy(path, incoming)
        ds = dcmread(path, stop_before_pixels=True)
        outcome = intake.store(incoming, sop_class_uid=ds.SOPClassUID,
                               sop_instance_uid=ds.SOPInstanceUID, calling_ae="T",
                               called_ae="SPINENODE")
        ids.append(outcome.instance_id)
    return ids


def _probabilities(sessions) -> dict[str, float]:
    with sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Analysis.probability)
                               .join(Analysis.instance)).all()
    return dict(rows)


def test_a_task_analyses_a_batch_like_single_images(tmp_path: Path, test_bundle: Path) -> None:
    batched = load_settings(data_dir=tmp_path / "batched", bundle=test_bundle, batch_size=4,
                            batch_wait_ms=0, decode_workers=2)
    single = load_settings(data_dir=tmp_path / "single", bundle=test_bundle)
    paths = [make_radiograph(tmp_path / "images" / f"{i}.dcm", rows=200 + 10 * i, columns=160,
                             seed=i) for i in range(5)]
    results = {}
    for name, settings in (("batched", batched), ("single", single)):
        settings.make_dirs()
        migrate.upgrade(settings.effective_database_url)
        sessions = session_factory(settings.effective_database_url)
        ids = _store(settings, paths)
        mark_queued(sessions, ids, reason="")
        pipeline = Pipeline(settings, sessions, enqueue_delivery=lambda delivery_id: None)
        assert pipeline.process(ids[0]).status == "done"
        with sessions() as session:
            done = session.scalar(select(func.count()).where(Instance.status == "done"))
        assert done == (4 if name == "batched" else 1)
        for instance_id in ids[1:]:
            pipeline.process(instance_id)
        with sessions() as session:
            assert session.scalar(select(func.count(Analysis.id))) == 5
        results[name] = _probabilities(sessions)
    assert results["batched"].keys() == results["single"].keys()
    for uid, probability in results["single"].items():
        assert results["batched"][uid] == pytest.approx(probability, abs=1e-4)


def test_batching_in_the_embedded_worker(tmp_path: Path, sqlite_url: str, test_bundle: Path,
                                         start_node) -> None:
    node = start_node(sqlite_url, args=("--no-worker",), env={
        "SPINENODE_BUNDLE": str(test_bundle), "SPINENODE_BATCH_SIZE": "4"})
    files = [make_radiograph(tmp_path / f"{i}.dcm", seed=i) for i in range(6)]
    assert storescu(node.port, files).returncode == 0
    node.stop()
    start_node(sqlite_url, env={"SPINENODE_BUNDLE": str(test_bundle),
                                "SPINENODE_BATCH_SIZE": "4"})
    rows = wait_until_settled(sqlite_url, 6, timeout=180)
    assert [row.status for row in rows] == ["done"] * 6
    with session_factory(sqlite_url)() as session:
        assert session.scalar(select(func.count(Analysis.id))) == 6
    assert "daemonic" not in node.log()


def test_an_unreadable_spool_file_is_retried_and_a_missing_one_fails(
        tmp_path: Path, sqlite_url: str, test_bundle: Path) -> None:
    """A file that cannot be read now (here a folder in its place) is given back for another
    attempt; one that is gone fails with that reason. Neither is called undecodable."""
    settings = load_settings(data_dir=tmp_path / "data", bundle=test_bundle, batch_size=2,
                             batch_wait_ms=0, decode_workers=2)
    settings.make_dirs()
    migrate.upgrade(settings.effective_database_url)
    sessions = session_factory(settings.effective_database_url)
    paths = [make_radiograph(tmp_path / "images" / f"{i}.dcm", rows=120, columns=100, seed=i)
             for i in range(2)]
    ids = _store(settings, paths)
    with sessions() as session:
        unreadable, missing = (Path(session.get(Instance, i).spool_path) for i in ids)
    unreadable.unlink()
    unreadable.mkdir()
    missing.unlink()
    mark_queued(sessions, ids, reason="")
    Pipeline(settings, sessions, enqueue_delivery=lambda delivery_id: None).process(ids[0])
    with sessions() as session:
        retried, failed = (session.get(Instance, i) for i in ids)
        assert (retried.status, failed.status) == ("queued", "failed")
        assert retried.last_error.startswith("cannot read spool file")
        assert failed.last_error == f"spool file missing: {missing}"
