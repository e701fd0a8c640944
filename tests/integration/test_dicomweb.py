"""DICOMweb destinations: the node's objects go by STOW-RS, through the same outbox, retries and
dead letters as C-STORE, to Orthanc's DICOMweb plugin behind HTTP basic authentication, with
the credentials from a secrets folder."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from dicom_node.config import Destination
from dicom_node.outbox import Timeouts, stow_file
from tests.support.fault_peers import http_answering
from tests.support.node import deliveries, free_port, storescu, wait_for
from tests.support.orthanc import Orthanc
from training.synthetic import make_radiograph


def _deliveries(node) -> dict[str, list[dict]]:  # noqa: ANN001
    """Destination -> its deliveries, as `spinenode deliveries --json` lists them."""
    found: dict[str, list[dict]] = {}
    for row in deliveries(node.database_url):
        found.setdefault(row["destination"].split("#")[0], []).append(row)
    return found


def test_results_go_by_stow_rs_with_the_credentials_from_the_secrets_folder(
        tmp_path: Path, sqlite_url: str, test_bundle: Path, start_node) -> None:
    node_port = free_port()
    archive = Orthanc(tmp_path / "archive", node_port, dicomweb=True,
                      users={"spinenode": "s3cret"})
    locked = Orthanc(tmp_path / "locked", node_port, dicomweb=True, users={"other": "x"})
    try:
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        (secrets / f"127.0.0.1_{archive.http_port}").write_text("Basic spinenode:s3cret\n")
        good = f"http://127.0.0.1:{archive.http_port}/dicom-web"
        refused = f"http://127.0.0.1:{locked.http_port}/dicom-web"  # no credentials for it
        node = start_node(sqlite_url, port=node_port, env={
            "SPINENODE_BUNDLE": str(test_bundle),
            "SPINENODE_DESTINATIONS": f"{good}#sr+sc,{refused}#sc",
            "SPINENODE_DICOMWEB_SECRETS_DIR": str(secrets),
            "SPINENODE_DELIVERY_RETRY_SECONDS": "1"})
        source = make_radiograph(tmp_path / "spine.dcm")
        study = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
        assert storescu(node.port, [source]).returncode == 0

        def finished() -> dict[str, list[dict]] | None:
            rows = _deliveries(node)
            done = (len(rows.get(good, [])) == 2 and len(rows.get(refused, [])) == 1
                    and all(r["status"] in ("delivered", "failed")
                            for found in rows.values() for r in found))
            return rows if done else None

        rows = wait_for(finished, 120, interval=1, what="both destinations settled")
        assert sorted((r["kind"], r["status"]) for r in rows[good]) == \
            [("sc", "delivered"), ("sr", "delivered")]
        (dead,) = rows[refused]
        assert dead["status"] == "failed" and dead["attempts"] == 1  # 401: no point retrying
        assert dead["last_error"] == f"{refused} answered HTTP 401"
        assert archive.has_series(study, "SR") and archive.has_series(study, "OT")
        assert "s3cret" not in node.log()
    finally:
        archive.stop()
        locked.stop()


def test_a_dicomweb_server_that_does_not_answer_is_tried_again(tmp_path: Path) -> None:
    path = make_radiograph(tmp_path / "spine.dcm")
    result = stow_file(path, Destination.parse(f"http://127.0.0.1:{free_port()}/dicom-web"),
                       secrets_dir=None, timeouts=Timeouts(5, 5, 5))
    assert not result.delivered and not result.permanent
    assert result.reason.startswith("no answer from http://127.0.0.1:")


def test_a_busy_dicomweb_server_is_asked_once_a_task(tmp_path: Path) -> None:
    # 503: tried again later by the outbox's backoff, not five times inside the task (which
    # held the worker for 30 s a delivery while the server was down).
    with http_answering(503) as (server, asked):
        url = f"{server}/dicom-web"
        result = stow_file(make_radiograph(tmp_path / "spine.dcm"), Destination.parse(url),
                           secrets_dir=None, timeouts=Timeouts(5, 5, 5))
    assert not result.delivered and not result.permanent
    assert result.reason == f"{url} answered HTTP 503"
    assert asked == ["/dicom-web/studies"]


def test_credentials_come_from_the_hosts_file_in_the_secrets_folder(tmp_path: Path) -> None:
    from dicom_node.outbox import _credentials

    (tmp_path / "pacs.example").write_text("Bearer abc.def\n")
    (tmp_path / "archive_8042").write_text("Basic user:pa:ss\n")
    token = Destination.parse("https://pacs.example/dicom-web")
    basic = Destination.parse("http://archive:8042/dicom-web")
    other = Destination.parse("https://elsewhere/dicom-web")
    assert _credentials(token, tmp_path) == "Bearer abc.def"
    assert _credentials(basic, tmp_path) == "Basic dXNlcjpwYTpzcw=="  # base64 of user:pa:ss
    assert _credentials(other, tmp_path) == "" and _credentials(token, None) == ""
