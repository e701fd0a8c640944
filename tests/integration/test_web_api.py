"""An admin uses the results API of a node on PostgreSQL and Redis that analysed two studies:
tokens and roles, filters and cursor pagination, one study's timeline, an operator retrying a
failed delivery and re-queueing a failed instance, the audit log of all that, readiness and
the Prometheus metrics; then ``spinenode web`` alone on the same database."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import quote

import numpy as np
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit
from sqlalchemy import select

from dicom_node.db.models import ApiToken
from dicom_node.db.session import session_factory
from tests.support.bundles import make_test_bundle
from tests.support.fault_peers import Pacs
from tests.support.node import SPINENODE, free_port, storescu, wait_for
from tests.support.web import Http, make_token
from training.synthetic import make_radiograph


def _study(tmp_path: Path, name: str, accession: str, patient_id: str, seed: int) -> Path:
    path = make_radiograph(tmp_path / f"{name}.dcm", seed=seed)
    ds = dcmread(path)
    ds.AccessionNumber, ds.PatientID = accession, patient_id
    ds.save_as(path)
    return path


def _undecodable(tmp_path: Path) -> Path:
    """A JPEG image whose compressed stream is noise: accepted, then fails in decode."""
    path = make_radiograph(tmp_path / "broken.dcm", seed=9)
    ds = dcmread(path)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + np.random.default_rng(0).bytes(3000)
                                + b"\xff\xd9"])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.AccessionNumber = "ACC-BROKEN"
    ds.save_as(path, enforce_file_format=True)
    return path


def _pages_of_one(client: Http, listing: str) -> list[str]:
    """The accession numbers of a listing read a page of one at a time, following the cursor
    to the page that says it is the last."""
    found, cursor = [], ""
    while len(found) < 10:
        page = client.ok(f"{listing}limit=1{cursor}")
        found += [row["accession_number"] for row in page["items"]]
        if not page["next_cursor"]:
            return found
        cursor = f"&cursor={page['next_cursor']}"
    raise AssertionError(f"{listing}: no last page after {found}")


def test_results_api_for_viewers_and_operators(tmp_path: Path, postgres_url: str,
                                               redis_url: str, start_node) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", threshold=0.0, detector="quadrants")
    pacs = Pacs(tmp_path / "pacs")  # not started yet: deliveries fail
    node = start_node(postgres_url, broker_url=redis_url, env={
        "SPINENODE_BUNDLE": str(bundle), "SPINENODE_DESTINATIONS": pacs.destination,
        "SPINENODE_MAX_DELIVERY_ATTEMPTS": "1", "SPINENODE_MAX_ATTEMPTS": "1",
        "SPINENODE_WORKER_HEARTBEAT_SECONDS": "1"})
    first = _study(tmp_path, "first", "ACC-1", "PAT-A", seed=1)
    second = _study(tmp_path, "second", "ACC-2", "PAT-B", seed=2)
    assert storescu(node.port, [first]).returncode == 0
    assert storescu(node.port, [second]).returncode == 0
    assert storescu(node.port, [_undecodable(tmp_path)], "-xy").returncode == 0  # JPEG 8-bit
    anonymous = Http(node.http_port)
    viewer = anonymous.as_(make_token(node, "ward-viewer", "viewer"))
    ops = anonymous.as_(make_token(node, "ops", "operator"))
    # The API documents itself at /docs (its OpenAPI schema served locally), without a token.
    docs_status, docs = anonymous.get("/docs")
    assert docs_status == 200 and "openapi.json" in docs
    assert "/api/v1/instances" in anonymous.ok("/openapi.json")["paths"]

    # No token, a wrong one, or none at all on a page: no patient data.
    assert anonymous.get("/api/v1/instances")[0] == 401
    assert anonymous.as_("sn_not-a-token").get("/api/v1/instances")[0] == 401
    assert anonymous.get("/health/live") == (200, {"live": True})

    def settled() -> list[dict] | None:
        rows = viewer.ok("/api/v1/instances")["items"]
        done = [r["status"] for r in rows]
        return rows if sorted(done) == ["done", "done", "failed"] else None

    rows = wait_for(settled, 180, interval=1, what="two images analysed and one failed")
    assert [r["accession_number"] for r in rows] == ["ACC-BROKEN", "ACC-2", "ACC-1"]  # newest
    analysis = rows[2]["analysis"]
    assert analysis["label"] == "abnormal" and analysis["threshold"] == 0.0
    assert set(analysis["member_probabilities"]) and analysis["bundle"].endswith("0.0.1-test")
    assert set(analysis["seconds"]) == {"decode", "classify", "detect"}
    assert analysis["device"].startswith("cpu ")  # and its precision
    assert [f["class"] for f in analysis["findings"]] == ["Osteophytes"] * 4
    assert all(len(f["box"]) == 4 for f in analysis["findings"])

    # Filters an admin uses.
    def uids(query: str) -> list[str]:
        return [r["accession_number"] for r in viewer.ok(f"/api/v1/instances?{query}")["items"]]
    assert uids("accession=ACC-1") == ["ACC-1"]
    assert uids("patient_id=PAT-B") == ["ACC-2"]
    assert uids("label=abnormal") == ["ACC-2", "ACC-1"]
    assert uids("label=normal") == []
    assert uids("finding=Osteophytes") == ["ACC-2", "ACC-1"]
    assert uids("status=failed") == ["ACC-BROKEN"]
    assert uids("calling_ae=MODALITY") == ["ACC-BROKEN", "ACC-2", "ACC-1"]
    assert uids("calling_ae=ELSEWHERE") == []
    study_uid = rows[2]["study_uid"]
    assert uids(f"study_uid={study_uid}") == ["ACC-1"]
    assert uids(f"sop_instance_uid={rows[1]['sop_instance_uid']}") == ["ACC-2"]
    received = quote(rows[1]["received_at"])
    assert uids(f"since={received}") == ["ACC-BROKEN", "ACC-2"]
    assert uids(f"until={received}") == ["ACC-1"]
    assert viewer.get("/api/v1/instances?label=maybe")[0] == 422

    # Cursor pagination: three pages of one, the same rows in the same order, then the end.
    assert _pages_of_one(viewer, "/api/v1/instances?") == ["ACC-BROKEN", "ACC-2", "ACC-1"]
    assert viewer.get("/api/v1/instances?cursor=garbage")[0] == 400
    # Oldest first, paged the same way; a cursor given out for one order is refused by the other.
    oldest = viewer.ok("/api/v1/instances?order=oldest&limit=2")
    assert [r["accession_number"] for r in oldest["items"]] == ["ACC-1", "ACC-2"]
    rest = viewer.ok(f"/api/v1/instances?order=oldest&limit=2&cursor={oldest['next_cursor']}")
    assert [r["accession_number"] for r in rest["items"]] == ["ACC-BROKEN"]
    assert rest["next_cursor"] is None
    assert viewer.get(f"/api/v1/instances?cursor={oldest['next_cursor']}")[0] == 400
    assert viewer.get("/api/v1/instances?order=sideways")[0] == 422

    # One study, with its instance's event timeline.
    study = viewer.ok(f"/api/v1/studies/{study_uid}")
    assert study["accession_number"] == "ACC-1" and study["patient_id"] == "PAT-A"
    events = [e["event"] for e in study["instances"][0]["events"]]
    assert events[0] == "received" and {"claimed", "decoded", "analysed"} <= set(events)
    instance = viewer.ok(f"/api/v1/instances/{rows[2]['sop_instance_uid']}")
    assert instance["instances"][0]["analysis"]["findings"] == analysis["findings"]
    assert viewer.get("/api/v1/studies/1.2.3.4")[0] == 404

    # Deliveries failed (nobody listening, one attempt); an operator retries one, now that the
    # PACS is up. A viewer may not.
    # Two studies: two SC overlays and, once each study is quiet, two SRs.
    failed = wait_for(lambda: (lambda rows: rows if len(rows) == 4 else None)(
        viewer.ok("/api/v1/deliveries?status=failed")), 120, interval=1,
        what="four failed deliveries")
    target = failed[0]
    assert viewer.post(f"/api/v1/deliveries/{target['id']}/retry")[0] == 403

    # The studies, now that both analysed ones have their report: newest first, each with its
    # images and what they say together; the study whose only image failed has no report.
    listed = viewer.ok("/api/v1/studies")
    assert [s["accession_number"] for s in listed["items"]] == ["ACC-BROKEN", "ACC-2", "ACC-1"]
    first = listed["items"][2]
    assert (first["study_uid"], first["patient_id"], first["images"]) == (study_uid, "PAT-A", 1)
    assert first["last_received_at"] == rows[2]["received_at"]
    assert first["report"]["version"] == 1 and first["report"]["label"] == "abnormal"
    assert first["report"]["finding_count"] == 4
    assert first["report"]["probability"] == analysis["probability"]
    # Its thumbnail: the SC overlay of the image that gave the report its probability.
    (overlay,) = [o["sop_instance_uid"] for o in viewer.ok(f"/api/v1/studies/{study_uid}")
                  ["instances"][0]["analysis"]["objects"] if o["kind"] == "sc"]
    assert first["report"]["overlay_sop_instance_uid"] == overlay
    assert listed["items"][0]["report"] is None

    def studies(query: str) -> list[str]:
        return [s["accession_number"] for s in viewer.ok(f"/api/v1/studies?{query}")["items"]]
    assert studies("label=abnormal") == ["ACC-2", "ACC-1"] and studies("label=normal") == []
    assert studies("accession=ACC-2") == ["ACC-2"] and studies("patient_id=PAT-A") == ["ACC-1"]
    second_arrived = quote(listed["items"][1]["first_received_at"])
    assert studies(f"since={second_arrived}") == ["ACC-BROKEN", "ACC-2"]
    assert studies(f"until={second_arrived}&order=oldest") == ["ACC-1"]
    assert _pages_of_one(viewer, "/api/v1/studies?order=oldest&") == ["ACC-1", "ACC-2",
                                                                      "ACC-BROKEN"]
    assert viewer.get("/api/v1/studies?cursor=garbage")[0] == 400
    assert anonymous.get("/api/v1/studies")[0] == 401
    pacs.start()
    try:
        assert ops.post(f"/api/v1/deliveries/{target['id']}/retry") == (
            200, {"delivery": target["id"], "status": "pending"})
        wait_for(lambda: {d["id"]: d["status"] for d in viewer.ok("/api/v1/deliveries")}
                 [target["id"]] == "delivered", 60, interval=0.5, what="the retried delivery")
        assert pacs.received()[target["sop_instance_uid"]] == 1
        assert ops.post(f"/api/v1/deliveries/{target['id']}/retry")[0] == 409  # not failed now
    finally:
        pacs.stop()

    # The failed image, re-queued by the operator: analysed again (and fails again).
    broken = rows[0]["sop_instance_uid"]
    assert viewer.post(f"/api/v1/instances/{broken}/requeue")[0] == 403
    assert ops.post(f"/api/v1/instances/{broken}/requeue")[0] == 200

    def timeline() -> list[dict] | None:
        shown = viewer.ok(f"/api/v1/instances/{broken}")["instances"][0]
        asked = [e for e in shown["events"] if e["event"] == "retry-requested"]
        return shown["events"] if asked and shown["status"] == "failed" else None
    events = wait_for(timeline, 60, interval=0.5, what="the re-queued image failing again")
    asked = next(e for e in events if e["event"] == "retry-requested")
    assert asked["detail"].startswith("by ops (was: ")
    assert [e["event"] for e in events].count("failed") == 2

    # The audit log: who read or did what, refused attempts included.
    audit = ops.ok("/api/v1/audit?limit=1000")
    assert viewer.get("/api/v1/audit")[0] == 403
    seen = {(a["token"], a["method"], a["status"]) for a in audit}
    assert ("", "GET", 401) in seen and ("ward-viewer", "POST", 403) in seen
    assert ("ops", "POST", 200) in seen
    assert any(a["path"] == "/api/v1/instances?accession=ACC-1" and a["token"] == "ward-viewer"
               for a in audit)
    assert not any(a["path"].startswith("/health") for a in audit)

    # Ready: database migrated, Redis, spool, a worker that beat lately and serves the bundle.
    status, ready = anonymous.get("/health/ready")
    assert status == 200 and ready["ready"], ready
    assert "0.0.1-test" in ready["checks"]["bundle"]["detail"]

    metrics = anonymous.ok("/metrics")
    assert 'spinenode_c_store_requests_total{calling_ae="MODALITY",status="0x0000"} 3.0' \
        in metrics
    assert re.search(r"^spinenode_received_bytes_total [1-9]", metrics, re.M)
    assert 'spinenode_findings_total{class="Osteophytes"} 8.0' in metrics
    assert 'spinenode_analysis_stage_seconds_count{stage="classify"} 2.0' in metrics
    assert 'spinenode_instances{status="done"} 2.0' in metrics
    assert 'spinenode_dead_letters{kind="instance"} 1.0' in metrics
    assert re.search(r'^spinenode_deliveries\{destination="PACS@127\.0\.0\.1:\d+",'
                     r'status="delivered"\} 1\.0', metrics, re.M)
    assert re.search(r'^spinenode_bundle_info\{name="[^"]+",version="0\.0\.1-test",', metrics,
                     re.M)
    assert "spinenode_worker_heartbeat_age_seconds{" in metrics
    assert "spinenode_queue_depth 0.0" in metrics

    env = {**os.environ, "SPINENODE_DATABASE_URL": node.database_url,
           "SPINENODE_DATA_DIR": str(node.data_dir)}
    # Tokens are listed by name and role, never by secret; the database holds only its hash.
    listed = subprocess.run([*SPINENODE, "tokens", "list"], env=env, check=True,
                            capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"ward-viewer\s+viewer", listed) and re.search(r"ops\s+operator", listed)
    assert viewer.token not in listed and ops.token not in listed
    with session_factory(node.database_url)() as session:
        stored = {t.name: t.secret_sha256 for t in session.scalars(select(ApiToken))}
    assert stored["ward-viewer"] == hashlib.sha256(viewer.token.encode()).hexdigest()
    assert viewer.token not in str(stored)

    # A revoked token stops working at once.
    subprocess.run([*SPINENODE, "tokens", "revoke", "ward-viewer"], env=env, check=True,
                   capture_output=True, timeout=60)
    assert viewer.get("/api/v1/instances")[0] == 401

    # The compose file's health checks, as commands.
    def health(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*SPINENODE, "health", *args], env=env, capture_output=True,
                              text=True, timeout=60)
    assert health("--url", anonymous.base, "--ready").returncode == 0
    assert health("--worker").returncode == 0

    # `spinenode web` alone on the same database, over HTTPS with a certificate made here: the
    # same answers; once the node (and its worker) stop, not ready, and it says why.
    cert, key = tmp_path / "web.pem", tmp_path / "web.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    web_port = free_port()
    web = subprocess.Popen([*SPINENODE, "web"], env={
        **env, "SPINENODE_HTTP_PORT": str(web_port), "SPINENODE_BROKER_URL": redis_url,
        "SPINENODE_BUNDLE": str(bundle), "SPINENODE_HTTP_SSL_CERTFILE": str(cert),
        "SPINENODE_HTTP_SSL_KEYFILE": str(key)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        alone = Http(web_port, ops.token, https_ca=cert)
        wait_for(lambda: alone.live() or web.poll() is not None, 30,
                 what="spinenode web to listen")
        assert web.poll() is None and alone.base.startswith("https://")
        assert alone.ok("/api/v1/instances?accession=ACC-1")["items"][0]["analysis"] == analysis
        node.stop()
        status, ready = alone.get("/health/ready")
        assert status == 503 and not ready["checks"]["worker"]["ok"]
        assert ready["checks"]["database"]["ok"] and ready["checks"]["broker"]["ok"]
        assert health("--worker").returncode == 2  # the worker removed its heartbeat
    finally:
        web.terminate()
        web.wait(30)
