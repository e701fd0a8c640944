"""An admin finds a study by accession number and reads everything a node on PostgreSQL and Redis
did with it (`spinenode show`), and exports results (`spinenode results`)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

from pydicom import dcmread

from tests.support.bundles import make_test_bundle
from tests.support.node import SPINENODE, free_port, shown, storescu, wait_for
from training.synthetic import make_radiograph


def _cli(node, *args: str, check: bool = True) -> subprocess.CompletedProcess:  # noqa: ANN001
    env = {**os.environ, "SPINENODE_DATA_DIR": str(node.data_dir),
           "SPINENODE_DATABASE_URL": node.database_url}
    result = subprocess.run([*SPINENODE, *args], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 or not check, result.stderr
    return result


def test_show_a_study_by_accession_and_export_its_results(tmp_path: Path, postgres_url: str,
                                                          redis_url: str, start_node) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", threshold=0.0, detector="quadrants")
    node = start_node(postgres_url, broker_url=redis_url, env={
        "SPINENODE_BUNDLE": str(bundle),
        "SPINENODE_DESTINATIONS": f"PACS@127.0.0.1:{free_port()}"})
    path = make_radiograph(tmp_path / "spine.dcm")
    ds = dcmread(path)
    ds.AccessionNumber = "ACC-4711"
    ds.save_as(path)
    assert storescu(node.port, [path]).returncode == 0

    def reported() -> dict | None:
        found = shown(node.database_url, accession="ACC-4711")
        return found if found and found["reports"] else None

    wait_for(reported, 120, interval=1, what="the study analysed and reported")
    study = json.loads(_cli(node, "show", "--accession", "ACC-4711", "--json").stdout)
    assert study["study_uid"] == str(ds.StudyInstanceUID) and study["patient_id"] == "TEST-0001"
    (report,) = study["reports"]
    assert (report["version"], report["label"], report["finding_count"]) == (1, "abnormal", 4)
    assert [o["kind"] for o in report["objects"]] == ["sr"]
    (instance,) = study["instances"]
    assert instance["sop_instance_uid"] == str(ds.SOPInstanceUID)
    analysis = instance["analysis"]
    assert [f["class"] for f in analysis["findings"]] == ["Osteophytes"] * 4
    assert [o["kind"] for o in analysis["objects"]] == ["sc"]
    (delivery,) = analysis["objects"][0]["deliveries"]
    assert delivery["destination"].startswith("PACS@127.0.0.1:")  # nobody there: retried
    events = [e["event"] for e in instance["events"]]
    assert events[:1] == ["received"] and {"claimed", "decoded", "analysed"} <= set(events)
    # The same study by its UID, and one instance by its SOP Instance UID, in text.
    by_uid = json.loads(_cli(node, "show", str(ds.StudyInstanceUID), "--json").stdout)
    assert by_uid["instances"] == study["instances"]
    text = _cli(node, "show", str(ds.SOPInstanceUID)).stdout
    assert "Osteophytes 0.95 at [" in text and "report v1: abnormal" in text
    missing = _cli(node, "show", "1.2.3.4", check=False)
    assert missing.returncode == 2 and "no study or instance 1.2.3.4" in missing.stderr

    rows = list(csv.DictReader(io.StringIO(_cli(node, "results", "--csv").stdout)))
    assert [(r["accession_number"], r["label"], r["findings"], r["finding_classes"])
            for r in rows] == [("ACC-4711", "abnormal", "4", "Osteophytes")]
    assert json.loads(_cli(node, "results", "--label", "normal", "--json").stdout) == []
    assert json.loads(_cli(node, "results", "--finding", "Osteophytes", "--json").stdout)
    assert json.loads(_cli(node, "results", "--finding", "Surgical implant", "--json").stdout) \
        == []
