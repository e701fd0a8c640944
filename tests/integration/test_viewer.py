"""A radiologist opens our results in OHIF, the reference web viewer for TID 1500: a study goes
into Orthanc, Orthanc routes it to the node, the node's SR and SC come back, and OHIF (its
prebuilt app from npm, reading Orthanc's DICOMweb) shows them in the system Chromium, headless.

Screenshots are kept in ``test-artifacts/viewer/`` (or ``$SPINENODE_ARTIFACTS/viewer``).
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.db.models import Analysis, Finding
from dicom_node.db.session import session_factory
from tests.support.bundles import make_test_bundle
from tests.support.node import free_port, storescu, wait_for
from tests.support.orthanc import Orthanc
from tests.support.viewer import CHROMIUM, ViewerServer
from training.synthetic import make_radiograph

ARTIFACTS = Path(os.environ.get("SPINENODE_ARTIFACTS",
                                Path(__file__).parents[2] / "test-artifacts"))
SR_SERIES = "AI spine analysis report"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[Orthanc, int, ViewerServer]]:
    """Orthanc with DICOMweb, routing to a node port, and OHIF in front of it."""
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port, dicomweb=True)
    viewer = ViewerServer(orthanc.http_port)
    yield orthanc, node_port, viewer
    viewer.stop()
    orthanc.stop()


def _results_in_orthanc(orthanc: Orthanc, bundle: Path, database_url: str, start_node,  # noqa: ANN001
                        source: Path, node_port: int) -> str:
    start_node(database_url, port=node_port, env={
        "SPINENODE_BUNDLE": str(bundle),
        "SPINENODE_DESTINATIONS": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}/sr+sc"})
    study_uid = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    assert storescu(orthanc.dicom_port, [source], called_ae="ORTHANC").returncode == 0
    wait_for(lambda: orthanc.has_series(study_uid, "SR") and orthanc.has_series(study_uid, "OT"),
             180, interval=1, what="the node's SR and SC in Orthanc")
    return study_uid


class Browser:
    """One OHIF page in headless Chromium, with what its console said."""

    def __init__(self, playwright_api, viewer: ViewerServer, folder: Path):  # noqa: ANN001
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.chromium = playwright_api.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader",
                  "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"])
        self.page = self.chromium.new_page(viewport={"width": 1600, "height": 1000})
        # A radiologist who has seen OHIF's first-visit tour (its overlay takes the clicks).
        self.page.add_init_script(
            "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.viewer = viewer

    def open_study(self, study_uid: str) -> None:
        self.page.goto(self.viewer.study_url(study_uid))
        self.page.get_by_text(SR_SERIES).first.wait_for(timeout=60_000)

    def open_sr(self) -> None:
        self.page.get_by_text(SR_SERIES).first.dblclick()
        self.page.get_by_text("Do you want to continue tracking measurements").wait_for(
            timeout=60_000)
        time.sleep(3)
        # OHIF draws the SR's annotations at the viewport's next render; in a person's browser
        # that comes with any interaction (headless, it may not come by itself).
        self.page.evaluate("window.cornerstone.getEnabledElements()[0].viewport.render()")
        time.sleep(1)

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and OHIF's own error notice."""
        shown = self.page.get_by_text("Something went wrong").count()
        return self.errors + (["OHIF says: Something went wrong"] if shown else [])

    def screenshot(self, name: str) -> np.ndarray:
        png = self.page.screenshot(path=str(self.folder / f"{name}.png"))
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    def to_screen(self, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """Image pixels (column, row) of the displayed image -> page coordinates."""
        return self.page.evaluate("""points => {
            const viewport = window.cornerstone.getEnabledElements()[0].viewport;
            const imageId = viewport.getCurrentImageId();
            const frame = viewport.element.getBoundingClientRect();
            return points.map(point => {
                const world = window.cornerstone.utilities.imageToWorldCoords(imageId, point);
                const [x, y] = viewport.worldToCanvas(world);
                return [x + frame.left, y + frame.top];
            });
        }""", [list(point) for point in points])

    def svg_texts(self) -> list[str]:
        return [text.strip() for text in self.page.locator("svg tspan").all_text_contents()]

    def close(self) -> None:
        self.chromium.close()


def _analysis(database_url: str) -> Analysis:
    with session_factory(database_url)() as session:
        return session.scalars(select(Analysis)).one()


def _coloured_fraction(pixels: np.ndarray, corners: list[tuple[float, float]]) -> float:
    """How much of a rectangle's outline is drawn in colour on a grey radiograph."""
    (x0, y0), _, (x1, y1), _ = corners[:4]
    samples = [(x, y) for t in np.linspace(0.1, 0.9, 40)
               for x, y in ((x0 + t * (x1 - x0), y0), (x0 + t * (x1 - x0), y1),
                            (x0, y0 + t * (y1 - y0)), (x1, y0 + t * (y1 - y0)))]
    coloured = 0
    for x, y in samples:
        patch = pixels[round(y) - 1:round(y) + 2, round(x) - 1:round(x) + 2]
        coloured += bool((patch.max(axis=2) - patch.min(axis=2) > 60).any())
    return coloured / len(samples)


def test_ohif_draws_every_finding_with_its_name_and_score(
        tmp_path: Path, sqlite_url: str, start_node, pacs) -> None:  # noqa: ANN001
    orthanc, node_port, viewer = pacs
    bundle = make_test_bundle(tmp_path / "bundle", threshold=0.0, detector="quadrants")
    source = make_radiograph(tmp_path / "spine.dcm", rows=400, columns=300)
    study_uid = _results_in_orthanc(orthanc, bundle, sqlite_url, start_node, source,
                                    node_port)
    with session_factory(sqlite_url)() as session:
        findings = session.scalars(select(Finding)).all()
    assert len(findings) == 4 and {f.class_name for f in findings} == {"Osteophytes"}
    with sync_playwright() as api:
        browser = Browser(api, viewer, ARTIFACTS / "viewer")
        try:
            browser.open_study(study_uid)
            browser.screenshot("abnormal-1-study")
            browser.open_sr()
            pixels = browser.screenshot("abnormal-2-sr")
            # Each box labelled "<finding> <score>%:" over "Probability: <score> %", and the
            # image's border with its classification.
            texts = Counter(browser.svg_texts())
            analysis = _analysis(sqlite_url)
            assert texts == Counter(
                [f"{f.class_name} {f.score:.0%}:" for f in findings]
                + [f"Probability: {100 * f.score:.2f} %" for f in findings]
                + [f"Abnormal (abnormality {analysis.probability:.0%}):",
                   f"Probability: {100 * analysis.probability:.2f} %"])
            for finding in findings:
                corners = browser.to_screen([(finding.x0, finding.y0), (finding.x1, finding.y0),
                                             (finding.x1, finding.y1), (finding.x0, finding.y1)])
                assert _coloured_fraction(pixels, corners) > 0.3, corners
            browser.page.get_by_role("button", name="Yes").click()  # track them
            browser.page.locator("[data-cy=trackedMeasurements-btn]").click()
            panel = browser.page.get_by_text(f"Osteophytes {findings[0].score:.0%}", exact=True)
            panel.first.wait_for(timeout=30_000)
            assert panel.count() == len(findings)  # the measurements panel lists each by name
            browser.screenshot("abnormal-3-tracked")
            assert browser.problems() == []
        finally:
            browser.close()


def test_ohif_opens_the_sr_of_a_normal_image(tmp_path: Path, sqlite_url: str, start_node,
                                             pacs, test_bundle: Path) -> None:  # noqa: ANN001
    orthanc, node_port, viewer = pacs
    source = make_radiograph(tmp_path / "spine.dcm", rows=400, columns=300)
    study_uid = _results_in_orthanc(orthanc, test_bundle, sqlite_url, start_node,
                                    source, node_port)
    with session_factory(sqlite_url)() as session:
        assert session.scalars(select(Finding)).all() == []
    analysis = _analysis(sqlite_url)
    assert analysis.label == "normal"
    with sync_playwright() as api:
        browser = Browser(api, viewer, ARTIFACTS / "viewer")
        try:
            browser.open_study(study_uid)
            browser.open_sr()
            browser.screenshot("normal-sr")
            assert browser.svg_texts() == [f"Normal (abnormality {analysis.probability:.0%}):",
                                           f"Probability: {100 * analysis.probability:.2f} %"]
            assert browser.problems() == []
        finally:
            browser.close()
