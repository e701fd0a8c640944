"""Pretrained starts: a member or the detector begins training from a local file the user
supplies (ImageNet-pretrained timm weights, COCO-pretrained YOLO11), never from a download.

A file fits an architecture when every tensor of the model is in it with its shape, except the
head, whose size is the task's (1 output for DERNet, 7 classes for the detector, not ImageNet's
1,000 or COCO's 80): the head starts fresh. Anything else missing, or extra, is refused, since
a start half from the file and half random is not what anyone asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dicom_node.files import sha256_of
from workers.bundle import VINDR_CLASSES
from workers.dernet import build_member

# The classifier head of each member (timm's names): its shape is the task's.
MEMBER_HEADS = {"densenet121": "classifier.", "tf_efficientnetv2_s": "classifier.",
                "resnet50": "fc."}
DETECTORS = tuple(f"yolo11{scale}" for scale in "nsmlx")
START_FILE = "start.json"  # in a member's folder and in RUN/detect: where training began


class InitWeightsError(ValueError):
    """A start file that cannot be used; the message is one line."""


@dataclass
class Fit:
    """How a file's tensors meet a model's."""

    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)  # the head: left to start fresh
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    wrong_shape: list[str] = field(default_factory=list)  # outside the head

    @property
    def ok(self) -> bool:
        return bool(self.loaded) and not (self.missing or self.unexpected or self.wrong_shape)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded", f"{len(self.fresh)} head tensors fresh"]
        for name in ("missing", "unexpected", "wrong_shape"):
            names = getattr(self, name)
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more"
                                                if len(names) > 5 else "")
                parts.append(f"{name.replace('_', ' ')}: {shown}")
        return "; ".join(parts)


def fit(model: dict[str, torch.Tensor], found: dict[str, torch.Tensor], head: str) -> Fit:
    result = Fit()
    for name, tensor in model.items():
        if name not in found:
            (result.fresh if name.startswith(head) else result.missing).append(name)
        elif found[name].shape != tensor.shape:
            (result.fresh if name.startswith(head) else result.wrong_shape).append(name)
        else:
            result.loaded.append(name)
    result.unexpected = [name for name in found if name not in model
                         and not name.startswith(head)]
    return result


def _member_state(path: Path) -> dict[str, torch.Tensor]:
    """A timm checkpoint (plain, or wrapped in state_dict/model, EMA preferred) or
    safetensors, read as timm reads a local pretrained file; no code is unpickled."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path), weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file: one line
        raise InitWeightsError(f"{path}: not a readable weights file ({error})") from None


def _detector_state(path: Path) -> dict[str, torch.Tensor]:
    """An ultralytics checkpoint: a pickled model (as ultralytics itself loads one, so only
    a file the user trusts), or a plain state dict."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise InitWeightsError(f"{path}: not a readable weights file ({error})") from None
    model = checkpoint.get("ema") or checkpoint.get("model") if isinstance(checkpoint, dict) \
        else checkpoint
    state = model.float().state_dict() if hasattr(model, "state_dict") else model
    if not isinstance(state, dict):
        raise InitWeightsError(f"{path}: no model in this file")
    return state


def _detector_model(architecture: str, classes: int = len(VINDR_CLASSES)) -> torch.nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(f"{architecture}.yaml", nc=classes, verbose=False)


def check(path: Path, architecture: str) -> Fit:
    """How FILE fits ARCHITECTURE (a DERNet member, or yolo11n..x)."""
    if architecture in MEMBER_HEADS:
        return fit(build_member(architecture).state_dict(), _member_state(path),
                   MEMBER_HEADS[architecture])
    if architecture in DETECTORS:
        model = _detector_model(architecture)
        head = f"model.{len(model.model) - 1}."  # the Detect layer: its outputs are per class
        return fit(model.state_dict(), _detector_state(path), head)
    raise InitWeightsError(f"unknown architecture {architecture!r}; known: "
                           f"{', '.join([*MEMBER_HEADS, *DETECTORS])}")


def member_start(architecture: str, path: Path | None) -> torch.nn.Module:
    """The member to train: fresh, or holding FILE's tensors (its head fresh)."""
    model = build_member(architecture)
    if path is None:
        return model
    found = _member_state(path)
    result = fit(model.state_dict(), found, MEMBER_HEADS[architecture])
    if not result.ok:
        raise InitWeightsError(f"{path} does not fit {architecture}: {result.summary()}")
    model.load_state_dict({name: found[name] for name in result.loaded}, strict=False)
    return model


def record_start(folder: Path, path: Path | None, architecture: str) -> dict | None:
    """Write FOLDER/start.json (which file, its SHA-256, how it fit) and return it; None (and
    no file) for a fresh start."""
    if path is None:
        return None
    result = check(path, architecture)
    if not result.ok:
        raise InitWeightsError(f"{path} does not fit {architecture}: {result.summary()}")
    start = {"file": str(path), "sha256": sha256_of(path), "architecture": architecture,
             "loaded": len(result.loaded), "fresh": result.fresh}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / START_FILE).write_text(json.dumps(start, indent=1))
    return start


def recorded_starts(run: Path, members: list[str]) -> dict[str, str]:
    """What each component of a run started from: name -> SHA-256 (fresh ones left out)."""
    starts = {name: run / "classify" / name / START_FILE for name in members}
    starts["detector"] = run / "detect" / START_FILE
    return {name: json.loads(path.read_text())["sha256"]
            for name, path in starts.items() if path.exists()}
