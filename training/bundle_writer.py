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
    detector: torch.nn.Module  # an ultralytics DetectionModel
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
    contents.detector.names = dict(enumerate(contents.class_names))
    torch.save({"model": contents.detector, "date": datetime.now(UTC).isoformat()},
               detector_file)
    classifier = ClassifierSpec(members=members, input_size=contents.input_size,
                                source_size=contents.source_size,
                                threshold=contents.threshold,
                                **({"tta": contents.tta} if contents.tta else {}))
    detector = DetectorSpec(scale=contents.detector_scale, weights=detector_file.name,
                            sha256=sha256_of(detector_file), image_size=contents.image_size,
                            class_names=list(contents.class_names))
    manifest = Manifest(name=contents.name, version=contents.version,
                        created=datetime.now(UTC), clinical_use=contents.clinical_use,
                        validated_precisions=contents.validated_precisions,
                        classifier=classifier, detector=detector,
                        provenance=contents.provenance, metrics=contents.metrics)
    write_manifest(folder, manifest)
    load_bundle(folder)  # what we wrote must be what the workers accept
    return folder
