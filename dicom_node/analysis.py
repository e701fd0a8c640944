"""One analysis of one image as the node keeps and shows it: plain data, no imaging or DICOM
libraries, shared by the workers (who make it) and the result objects (which show it)."""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node import __version__


@dataclass(frozen=True)
class FindingBox:
    """A detected lesion, in the source image's pixels."""

    class_name: str
    score: float
    x0: float
    y0: float
    x1: float
    y1: float
    class_index: int = -1  # in the bundle's class list

    def outline(self) -> list[tuple[float, float]]:
        """The box as a closed polyline: four corners and the first again, (column, row)."""
        return [(self.x0, self.y0), (self.x1, self.y0), (self.x1, self.y1), (self.x0, self.y1),
                (self.x0, self.y0)]


@dataclass(frozen=True)
class Classification:
    """The DERNet ensemble's answer for one image."""

    member_probabilities: dict[str, float]  # architecture -> probability (mean over TTA)
    # architecture -> probability per TTA view, in the manifest's order (evaluation's ablation)
    view_probabilities: dict[str, tuple[float, ...]]
    probability: float  # weighted ensemble
    threshold: float
    abnormal: bool


@dataclass(frozen=True)
class AnalysisResult:
    """One bundle's analysis of one source image: what the runtime returns, the workers record
    and the result objects show."""

    bundle_name: str
    bundle_version: str
    clinical_use: bool
    classification: Classification
    findings: list[FindingBox]
    classify_seconds: float = 0.0  # per image (a batch's time divided among its images)
    detect_seconds: float = 0.0

    @property
    def abnormal(self) -> bool:
        return self.classification.abnormal

    @property
    def probability(self) -> float:
        return self.classification.probability

    @property
    def threshold(self) -> float:
        return self.classification.threshold

    @property
    def member_probabilities(self) -> dict[str, float]:
        return self.classification.member_probabilities

    @property
    def label(self) -> str:
        return "Abnormal" if self.abnormal else "Normal"

    @property
    def software_versions(self) -> tuple[str, str]:
        return (f"spinenode {__version__}", f"{self.bundle_name} {self.bundle_version}")

    def series_description(self, kind: str) -> str:
        suffix = "" if self.clinical_use else " NOT FOR CLINICAL USE"
        return f"AI {kind} (spinenode){suffix}"[:64]
