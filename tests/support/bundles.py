"""A bundle of the real architectures at a tiny input size with random weights: plumbing only.

Its manifest says clinical_use = false; its numbers mean nothing. A random detector finds
nothing; where a test needs findings, ``detector="quadrants"`` fixes the detection head so that
it finds one lesion of the first class in the middle of each quadrant of any image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch

from training.bundle_writer import BundleContents, ClassifierMember, save_bundle
from workers.dernet import build_member
from workers.offline import prepare_offline, ultralytics_modules

MEMBERS = (("densenet121", 0.42), ("tf_efficientnetv2_s", 0.32), ("resnet50", 0.26))


def make_test_bundle(folder: Path, *, version: str = "0.0.1-test", input_size: int = 64,
                     image_size: int = 64, scale: str = "n", threshold: float = 0.5,
                     validated_precisions: tuple[str, ...] | dict[str, list[str]] = ("float32",),
                     seed: int = 0,
                     detector: Literal["random", "quadrants"] = "random",
                     members: tuple[tuple[str, float], ...] = MEMBERS) -> Path:
    prepare_offline(folder.parent / "ultralytics")
    torch.manual_seed(seed)
    members = [ClassifierMember(name, build_member(name), weight) for name, weight in members]
    model = ultralytics_modules().DetectionModel(f"yolo11{scale}.yaml", nc=7, verbose=False)
    if detector == "quadrants":
        _find_a_lesion_per_quadrant(model)
    contents = BundleContents(
        name="spinenode-test", version=version, members=members, threshold=threshold,
        detector=model, detector_scale=scale, input_size=input_size, image_size=image_size,
        clinical_use=False,
        validated_precisions=(validated_precisions if isinstance(validated_precisions, dict)
                              else list(validated_precisions)),
        provenance={"note": "random weights made by tests/bundles.py; not for clinical use"},
    )
    return save_bundle(folder, contents)


def _find_a_lesion_per_quadrant(model: torch.nn.Module) -> None:
    """Make the head's output independent of the image: no detection at the two finer levels;
    at the coarsest (a 2x2 grid of cells), class 0 with score sigmoid(3) = 0.95 in each cell and
    a box reaching a quarter of a cell to each side of its centre (the distribution-focal-loss
    bins 0 and 1 weighted 3:1)."""
    head = model.model[-1]
    with torch.no_grad():
        for level, (box, cls) in enumerate(zip(head.cv2, head.cv3, strict=True)):
            box[-1].weight.zero_()
            cls[-1].weight.zero_()
            cls[-1].bias.fill_(-20.0)
            if level == len(head.cv2) - 1:
                cls[-1].bias[0] = 3.0
                bins = torch.full((4, head.reg_max), -20.0)
                bins[:, 0], bins[:, 1] = math.log(3.0), 0.0
                box[-1].bias.copy_(bins.flatten())
