"""A bundle of the real architectures at a tiny input size with random weights: plumbing only.

Its manifest says clinical_use = false; its numbers mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.bundle_writer import BundleContents, ClassifierMember, save_bundle
from workers.dernet import build_member
from workers.offline import prepare_offline, ultralytics_modules

MEMBERS = (("densenet121", 0.42), ("tf_efficientnetv2_s", 0.32), ("resnet50", 0.26))


def make_test_bundle(folder: Path, *, version: str = "0.0.1-test", input_size: int = 64,
                     image_size: int = 64, scale: str = "n", threshold: float = 0.5,
                     validated_precisions: tuple[str, ...] | dict[str, list[str]] = ("float32",),
                     seed: int = 0) -> Path:
    prepare_offline(folder.parent / "ultralytics")
    torch.manual_seed(seed)
    members = [ClassifierMember(name, build_member(name), weight) for name, weight in MEMBERS]
    detector = ultralytics_modules().DetectionModel(f"yolo11{scale}.yaml", nc=7, verbose=False)
    contents = BundleContents(
        name="spinenode-test", version=version, members=members, threshold=threshold,
        detector=detector, detector_scale=scale, input_size=input_size, image_size=image_size,
        clinical_use=False,
        validated_precisions=(validated_precisions if isinstance(validated_precisions, dict)
                              else list(validated_precisions)),
        provenance={"note": "random weights made by tests/bundles.py; not for clinical use"},
    )
    return save_bundle(folder, contents)
