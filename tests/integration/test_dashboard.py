"""An admin uses the dashboard page of a node on PostgreSQL and Redis in a real browser (Debian's
Chromium, headless, driven by Playwright): logs in with a token, sees the images wait in the
queue until a worker starts, finds a study by accession number, opens it, sees the overlay and
the timeline, and retries a failed delivery. The page loads nothing from elsewhere, and each
page and overlay read is in the audit log.

Screenshots are kept in ``test-artifacts/dashboard/`` (or ``$SPINENODE_ARTIFACTS``)."""

from __future__ import annotations

import os
from pathlib import Path

from playwright.sync_api import sync_playwright
from pydicom import dcmread

from tests.support.bundles import make_test_bundle
from tests.support.fault_peers import Pacs
from tests.support.node import storescu, wait_for
from tests.support.viewer import CHROMIUM
from tests.support.web import Http, make_token
from training.synthetic import make_radiograph

ARTIFACTS = Path(os.environ.get("SPINENODE_ARTIFACTS",
                                Path(__file__).parents[2] / "test-artifacts")) / "dashboard"


def _image(tmp_path: Path, accession: str, seed: int) -> Path:
    path = make_radiograph(tmp_path / f"{accession}.dcm", rows=512, columns=400, seed=seed)
    ds = dcmread(path)
    ds.AccessionNumber = accession
    ds.save_as(path)
    return path


def test_dashboard_find_open_and_retry(tmp_path: Path, postgres_url: str, redis_url: str,
                                       start_node) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", threshold=0.0, detector="quadrants")
    pacs = Pacs(tmp_path / "pacs")  # down at first: the deliveries fail
    env = {"SPINENODE_BUNDLE": str(bundle), "SPINENODE_DESTINATIONS": pacs.destination,
           "SPINENODE_MAX_DELIVERY_ATTEMPTS": "1"}
    # No worker yet: the images wait in Redis.
    node = start_node(postgres_url, broker_url=redis_url, args=("--no-worker",), env=env)
    assert storescu(node.port, [_image(tmp_path, "ACC-77", 1), _image(tmp_path, "ACC-78", 2)]
                    ).returncode == 0
    operator = make_token(node, "night-ops", "operator")
    viewer = make_token(node, "ward", "viewer")
    api = Http(node.http_port, operator)
    base = f"http://127.0.0.1:{node.http_port}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    elsewhere: list[str] = []

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda r: elsewhere.append(r.url)
                if not r.url.startswith(base) else None)
        try:
            # Not logged in: the login form. A wrong token is refused.
            page.goto(base + "/")
            assert page.url == base + "/login"
            page.fill("input[name=token]", "sn_wrong")
            page.click("button[type=submit]")
            page.get_by_role("alert").wait_for()
            assert "unknown or revoked" in page.get_by_role("alert").inner_text()
            page.fill("input[name=token]", operator)
            page.click("button[type=submit]")
            page.wait_for_url(base + "/")
            assert "night-ops (operator)" in page.inner_text("header")
            # Both images wait for a worker: the queue and how long the oldest has waited.
            assert page.inner_text("[data-status=queued]") == "2"
            assert page.inner_text("#queue-depth") == "2"
            waited = int(page.inner_text("#oldest-waiting").removesuffix(" s"))
            assert 0 <= waited <= api.ok("/api/v1/status")["oldest_waiting"]["age_seconds"] + 1
            # Both studies listed, neither reported yet.
            assert page.locator("#studies td", has_text="pending").count() == 2
            assert page.locator("#studies img.thumb").count() == 0

            # A worker starts. Each study: an SC overlay and, once the study is quiet, its SR;
            # four failed deliveries.
            start_node(postgres_url, broker_url=redis_url, command="worker", env=env)
            wait_for(lambda: len(api.ok("/api/v1/deliveries?status=failed")) == 4, 180,
                     interval=1, what="the studies analysed and reported and their deliveries "
                                      "failed")
            page.reload()
            assert page.inner_text("[data-status=done]") == "2"
            assert page.inner_text("[data-status=queued]") == "0"
            assert page.inner_text("#queue-depth") == "0"
            assert page.inner_text("#oldest-waiting") == "none"

            # Find the study by accession number: one row, with a thumbnail of its overlay.
            page.fill("input[name=accession]", "ACC-77")
            page.click("text=Search")
            page.wait_for_url("**/?accession=ACC-77*")
            rows = page.locator("#studies tr")
            assert rows.count() == 2  # header and the one study
            assert "abnormal" in rows.nth(1).inner_text()
            thumb = rows.nth(1).locator("img.thumb")
            wait_for(lambda: thumb.evaluate("img => img.complete && img.naturalWidth") == 96, 10,
                     what="the thumbnail")
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # Open it: the overlay large, the findings, the timeline, the failed delivery.
            page.click("a.study-link")
            page.wait_for_selector("img.overlay")
            overlay = page.locator("img.overlay")
            wait_for(lambda: overlay.evaluate("img => img.complete && img.naturalWidth") == 400,
                     10, what="the overlay at full size (the image's 400 columns)")
            assert page.locator("table.findings tr").count() == 5  # header and 4 boxes
            timeline = page.inner_text("table.timeline")
            assert "received" in timeline and "analysed" in timeline
            failed = page.locator("table.deliveries tr", has_text="failed")
            assert failed.count() == 2  # the study's SR and the image's overlay
            assert all("Retry" in row for row in failed.all_inner_texts())
            page.screenshot(path=str(ARTIFACTS / "study-failed-delivery.png"), full_page=True)

            # The PACS is back: retry from the page, and the delivery is done.
            pacs.start()
            failed.first.get_by_role("button", name="Retry").click()
            page.wait_for_load_state()

            def delivered() -> bool:
                page.reload()
                return page.locator("table.deliveries td.delivered").count() == 1
            wait_for(delivered, 60, interval=1, what="the retried delivery delivered")
            assert page.locator("table.deliveries tr", has_text="failed").count() == 1
            page.screenshot(path=str(ARTIFACTS / "study-delivered.png"), full_page=True)
            assert len(pacs.received()) == 1

            # A viewer sees the same page without the operator's buttons.
            page.click("text=Log out")
            page.wait_for_url(base + "/login")
            page.fill("input[name=token]", viewer)
            page.click("button[type=submit]")
            page.wait_for_url(base + "/")
            page.goto(base + "/?accession=ACC-78")
            page.click("a.study-link")
            page.wait_for_selector("img.overlay")
            assert page.locator("table.deliveries tr", has_text="failed").count() == 2
            assert page.get_by_role("button", name="Retry").count() == 0
        finally:
            browser.close()
            pacs.stop()
    assert elsewhere == []  # no CDN, no font service: everything from the node

    # Every page and overlay read is in the audit log, under the token that read it.
    audit = {(a["token"], a["path"].split("?")[0], a["status"])
             for a in api.ok("/api/v1/audit?limit=1000")}
    study_uid = dcmread(tmp_path / "ACC-77.dcm").StudyInstanceUID
    assert {("night-ops", "/", 200), ("night-ops", f"/studies/{study_uid}", 200),
            ("ward", "/", 200)} <= audit
    overlays = {(token, status) for token, path, status in audit if path.startswith("/overlays/")}
    assert overlays == {("night-ops", 200), ("ward", 200)}
