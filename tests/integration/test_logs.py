"""Logs: with SPINENODE_LOG_FORMAT=json every line the node and its worker write is one JSON
object, with instance/study UIDs and task ids as fields; and no patient name or ID appears in
them at any level, for a good image, a refused one and a delivery that fails."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydicom import dcmread

from tests.support.node import free_port, storescu, wait_for, wait_until_settled
from training.synthetic import make_radiograph

PATIENT_NAME = "Zyxwvut^Qwertyuiop"
PATIENT_ID = "PID-98765-XYZ"


def _patient_image(path: Path, **changes: object) -> Path:
    make_radiograph(path)
    ds = dcmread(path)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def test_json_logs_carry_ids_and_never_the_patient(tmp_path: Path, postgres_url: str,
                                                    redis_url: str, test_bundle: Path,
                                                    start_node) -> None:
    node = start_node(postgres_url, broker_url=redis_url, env={
        "SPINENODE_LOG_FORMAT": "json", "SPINENODE_LOG_LEVEL": "DEBUG",
        "SPINENODE_BUNDLE": str(test_bundle),
        "SPINENODE_DESTINATIONS": f"PACS@127.0.0.1:{free_port()}",  # nobody there
        "SPINENODE_DELIVERY_RETRY_SECONDS": "1"})
    good = _patient_image(tmp_path / "good.dcm")
    short = _patient_image(tmp_path / "short.dcm")
    ds = dcmread(short)
    ds.PixelData = ds.PixelData[:100]  # fewer bytes than Rows x Columns need: refused
    ds.save_as(short)
    assert storescu(node.port, [good]).returncode == 0
    storescu(node.port, [short])
    wait_until_settled(postgres_url, 1, timeout=120)
    wait_for(lambda: "will be retried" in node.log(), 60, what="a failed delivery logged")
    node.stop()

    # Each line one JSON object; but Celery prints its shutdown notice itself, plainly.
    lines = [line for line in node.log().splitlines() if line.strip()
             and not re.fullmatch(r"worker: \w+ shutdown \(MainProcess\)", line)]
    entries = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    stored = next(e for e in entries if e["message"].startswith("stored "))
    assert stored["sop_instance_uid"] == str(dcmread(good).SOPInstanceUID)
    assert stored["study_uid"] == str(dcmread(good).StudyInstanceUID)
    analysed = next(e for e in entries if " analysed with " in e["message"])
    assert analysed["instance_id"] == stored["instance_id"] and analysed["task_id"]
    assert any("Pixel Data holds" in e["message"] for e in entries)  # the refusal is logged
    text = node.log()
    for part in (*PATIENT_NAME.split("^"), PATIENT_ID):
        assert part not in text, f"{part} appears in the logs"
