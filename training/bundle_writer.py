"""Write a model bundle from trained (or, in tests, random) models: used by ``training``'s export
and by the tests' bundle helper, so both write exactly what the workers read."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from dicom_node.files import sha256_of
from workers.bundle import (
    CLASSIFIER_INPUT_SIZE,
    DETECTOR_IMAGE_SIZE,
    DETECTOR_SCALE,
    VINDR_CLASSES,
    ClassifierSpec,
    DetectorSpec,
    Manifest,
    MemberSpec,
    load_bundle,
    write_manifest,
)
from workers.detector import class_branch_width


@dataclass
class ClassifierMember:
    architecture: str
    model: torch.nn.Module
    ensemble_weight: float


@dataclass
class BundleContents:
    name: str
    version: str
    members: list[ClassifierMember]
    threshold: float
    detector: torch.nn.Module  # an ultralytics DetectionModel of yolo11{detector_scale}.yaml
    detector_scale: str = DETECTOR_SCALE
    class_names: tuple[str, ...] = VINDR_CLASSES
    input_size: int = CLASSIFIER_INPUT_SIZE
    source_size: int | None = None  # the training cache's long side (see ClassifierSpec)
    image_size: int = DETECTOR_IMAGE_SIZE
    tta: list[str] | None = None
    clinical_use: bool = False
    # {"classifier": [...], "detector": [...]}, or one list for both
    validated_precisions: dict[str, list[str]] | list[str] = field(
        default_factory=lambda: ["float32"])
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def save_bundle(folder: Path, contents: BundleContents) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for member in contents.members:
        file = folder / f"{member.architecture}.pt"
        torch.save(member.model.state_dict(), file)
        members.append(MemberSpec(architecture=member.architecture, weights=file.name,
                                  sha256=sha256_of(file),
                                  ensemble_weight=member.ensemble_weight))
    detector_file = folder / f"yolo11{contents.detector_scale}.pt"
    # Its fused float32 tensors alone: the workers read them with weights_only=True into
    # ultralytics' own layout of that scale (a pickled checkpoint could run code).
    detector = contents.detector.float()
    detector.fuse(verbose=False)
    torch.save(detector.state_dict(), detector_file)
    classifier = ClassifierSpec(members=members, input_size=contents.input_size,
                                source_size=contents.source_size,
                                threshold=contents.threshold,
                                **({"tta": contents.tta} if contents.tta else {}))
    detector = DetectorSpec(scale=contents.detector_scale, weights=detector_file.name,
                            sha256=sha256_of(detector_file), image_size=contents.image_size,
                            class_names=list(contents.class_names),
                            class_branch_width=class_branch_width(contents.detector))
    manifest = Manifest(name=contents.name, version=contents.version,
                        created=datetime.now(UTC), clinical_use=contents.clinical_use,
                        validated_precisions=_per_component(contents.validated_precisions),
                        classifier=classifier, detector=detector,
                        provenance=contents.provenance, metrics=contents.metrics)
    write_manifest(folder, manifest)
    load_bundle(folder)  # what we wrote must be what the workers accept
    return folder


def _per_component(validated: dict[str, list[str]] | list[str]) -> dict[str, list[str]]:
    """One list stands for both components."""
    return validated if isinstance(validated, dict) else {"classifier": list(validated),
                                                          "detector": list(validated)}
