"""Pretrained starts from local files: what fits, what does not, and that a member starts from
exactly the file's values (its head fresh)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.support.node import SPINENODE
from training.init_weights import InitWeightsError, check, member_start


def imagenet_like(architecture: str, path: Path, seed: int = 3) -> dict[str, torch.Tensor]:
    """A checkpoint shaped like timm's ImageNet weights (1,000-class head), of known values."""
    torch.manual_seed(seed)
    state = timm.create_model(architecture, pretrained=False, num_classes=1000).state_dict()
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)  # wrapped, as training scripts save them
    return state


def coco_like_detector(scale: str, path: Path) -> None:
    """An ultralytics checkpoint of YOLO11 with COCO's 80 classes."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(4)
    torch.save({"model": DetectionModel(f"yolo11{scale}.yaml", nc=80, verbose=False)}, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_member_starts_from_exactly_the_files_values(tmp_path: Path, suffix: str) -> None:
    saved = imagenet_like("resnet50", tmp_path / f"resnet50{suffix}")
    model = member_start("resnet50", tmp_path / f"resnet50{suffix}")
    state = model.state_dict()
    body = [name for name in state if not name.startswith("fc.")]
    assert len(body) > 300
    for name in body:
        torch.testing.assert_close(state[name], saved[name], rtol=0, atol=0, msg=name)
    assert state["fc.weight"].shape == (1, 2048)  # the task's head, fresh


def test_weights_check_says_what_fits(tmp_path: Path) -> None:
    imagenet_like("densenet121", tmp_path / "densenet.safetensors")
    fits = subprocess.run([*SPINENODE, "train", "weights", "check",
                           str(tmp_path / "densenet.safetensors"), "--arch", "densenet121"],
                          capture_output=True, text=True, timeout=300)
    assert fits.returncode == 0, fits.stderr
    assert "fits densenet121" in fits.stdout and "2 head tensors fresh" in fits.stdout
    wrong = subprocess.run([*SPINENODE, "train", "weights", "check",
                            str(tmp_path / "densenet.safetensors"), "--arch", "resnet50"],
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1
    assert "does NOT fit resnet50" in wrong.stdout
    assert "missing: conv1.weight" in wrong.stdout and "unexpected: features." in wrong.stdout
    with pytest.raises(InitWeightsError, match="does not fit resnet50"):
        member_start("resnet50", tmp_path / "densenet.safetensors")
    (tmp_path / "noise.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InitWeightsError, match="not a readable weights file"):
        check(tmp_path / "noise.pt", "resnet50")


def test_a_coco_detector_fits_its_scale_only(tmp_path: Path) -> None:
    coco_like_detector("n", tmp_path / "yolo11n.pt")
    same = check(tmp_path / "yolo11n.pt", "yolo11n")
    assert same.ok and same.fresh  # the class outputs: 80 there, 7 here
    assert all(name.startswith("model.23.") for name in same.fresh)
    other = check(tmp_path / "yolo11n.pt", "yolo11s")
    assert not other.ok and other.wrong_shape
