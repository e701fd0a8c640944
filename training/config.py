"""Training configuration: ``paper`` (the paper's settings), ``smoke`` (minutes on a CPU) or a
YAML file of the same shape."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from workers.bundle import CLASSIFIER_INPUT_SIZE, DETECTOR_IMAGE_SIZE, DETECTOR_SCALE

CONFIGS = Path(__file__).parent / "configs"


class DataConfig(BaseModel):
    model_config = {"extra": "forbid"}

    cache_size: int = Field(1024, ge=32)
    folds: int = Field(5, ge=2)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0


class ClassifyConfig(BaseModel):
    """DERNet training: AdamW, cosine, BCE with logits, early stopping on validation AUROC."""

    model_config = {"extra": "forbid"}

    members: list[str] = Field(default_factory=lambda: ["densenet121", "tf_efficientnetv2_s",
                                                        "resnet50"])
    input_size: int = Field(CLASSIFIER_INPUT_SIZE, ge=32)
    epochs: int = Field(60, ge=1)
    patience: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    batch_size_efficientnet: int = Field(24, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    # EfficientNetV2-S is trained at growing sizes, the epochs split evenly between them.
    progressive_sizes: list[int] = Field(default_factory=lambda: [128, 256, 384])
    weight_step: float = Field(0.05, gt=0, le=0.5)  # ensemble weight grid
    mixed_precision: bool = True  # bfloat16 autocast where the device computes it natively
    # Processes that load and augment images; a GPU needs several to be kept busy.
    loader_workers: int = Field(0, ge=0)
    seed: int = 0
    # Pretrained starts: member -> a local timm checkpoint or safetensors file (ImageNet
    # weights, say); a member not named here starts from random weights.
    init_weights: dict[str, Path] = Field(default_factory=dict)
    # The members a bundle serves: each one's best cross-validation fold, or (retrain, the
    # paper's final models) one trained on all of train for the median of the folds' best
    # epoch counts. The ensemble weights and threshold come from the folds either way.
    final_members: Literal["best_fold", "retrain"] = "best_fold"
    # Whether export checks int8 members on an x86-64 CPU (and the workers serve those within
    # the tolerance there). Their calibration takes minutes of the export: about 130 s of the
    # demo's, on 2 cores without AVX-512, which then kept one member of three in int8 (two
    # once the load's check compared with float32: README, int8 members).
    int8: bool = True


class DetectConfig(BaseModel):
    """YOLO11 training (the paper's settings by default) and our additions."""

    model_config = {"extra": "forbid"}

    scale: str = DETECTOR_SCALE
    image_size: int = Field(DETECTOR_IMAGE_SIZE, ge=32)
    epochs: int = Field(35, ge=1)
    batch: int = Field(12, ge=1)
    nominal_batch: int = Field(48, ge=1)  # batch 12 x 4 accumulation
    lr0: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 3.0
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    mosaic: float = 0.5
    hsv: tuple[float, float, float] = (0.015, 0.7, 0.4)
    fliplr: float = 0.5
    focal_gamma: float | None = 2.0  # None: plain BCE
    focal_alpha: float = 0.25
    balanced_sampling: bool = True
    scales: list[int] = Field(default_factory=lambda: [480, 576, 640, 704, 768])
    copy_paste: float = Field(0.2, ge=0, le=1)
    copy_paste_below: float = Field(0.05, ge=0, le=1)
    seed: int = 0
    loader_workers: int = Field(0, ge=0)  # as classify.loader_workers
    init_weights: Path | None = None  # an ultralytics checkpoint to start from (COCO, say)


class TrainingConfig(BaseModel):
    model_config = {"extra": "forbid"}

    data: DataConfig = Field(default_factory=DataConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line."""


def load_config(name_or_path: str) -> TrainingConfig:
    path = CONFIGS / f"{name_or_path}.yaml" if name_or_path in ("paper", "smoke", "demo") \
        else Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"no training config {name_or_path!r} (use paper, smoke or a file)")
    try:
        return TrainingConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as error:
        first = str(error).splitlines()
        raise ConfigError(f"{path}: {' '.join(first[:3])}") from None


def torch_device(text: str):  # noqa: ANN201 (torch is imported on use)
    """The training device (``cpu``, ``0``, ``cuda:1``...), parsed as the node parses its own."""
    from workers.runtime import select_device

    try:
        return select_device(text)
    except ValueError as error:
        raise ConfigError(str(error)) from None
