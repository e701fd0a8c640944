"""YOLO11 training through ultralytics with the paper's additions, each switchable:

- focal loss (gamma, alpha) for the classification term, in place of plain BCE;
- copy-paste of minority-class boxes into other training images (stock copy-paste needs masks);
- class-balanced image sampling, weight 1/sqrt(frequency) of the rarest category on the image;
- multi-scale training over a fixed set of sizes (the paper's {480, ..., 768}).

Fully offline: ultralytics comes through ``workers.offline``; the model is built from its YAML.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import WeightedRandomSampler
from torchvision.ops import sigmoid_focal_loss
from tqdm import tqdm

from training.config import DetectConfig
from training.init_weights import record_start
from training.progress import detector_epoch_line
from workers.offline import prepare_offline, ultralytics_modules


class FocalBCE(nn.Module):
    """Element-wise focal loss on logits: alpha_t * (1 - p_t)^gamma * BCE (no reduction), the
    drop-in for ultralytics' ``nn.BCEWithLogitsLoss(reduction="none")``; torchvision's."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma,
                                  reduction="none")


def balanced_weights(image_classes: list[set[int]]) -> np.ndarray:
    """Per image: 1/sqrt(frequency) of its rarest category (a class, or "normal" when it has
    no box), frequencies counted over images."""
    count = len(image_classes)
    categories: dict[int, int] = {}
    for classes in image_classes:
        for category in classes or {-1}:
            categories[category] = categories.get(category, 0) + 1
    return np.array([max((count / categories[c]) ** 0.5 for c in classes or {-1})
                     for classes in image_classes])


class MinorityCopyPaste:
    """Paste a box of a rare class, cut from another training image, onto this one."""

    def __init__(self, dataset, probability: float, below: float, seed: int):  # noqa: ANN001
        self.dataset, self.probability = dataset, probability
        classes = np.concatenate([label["cls"].reshape(-1) for label in dataset.labels] or
                                 [np.zeros(0)]).astype(int)
        frequency = np.bincount(classes, minlength=1) / max(len(classes), 1)
        rare = {c for c, f in enumerate(frequency) if 0 < f < below}
        self.donors = [(i, j) for i, label in enumerate(dataset.labels)
                       for j, c in enumerate(label["cls"].reshape(-1)) if int(c) in rare]
        self.seed, self.worker = seed, None
        self.rng = random.Random(seed)

    def _draws(self) -> random.Random:
        """This process's generator: each loader worker gets its own stream (a generator
        copied into every worker at fork would paste the same boxes in all of them)."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else None
        if worker != self.worker:
            self.worker, self.rng = worker, random.Random(f"{self.seed}/{worker}")
        return self.rng

    def __call__(self, label: dict) -> dict:
        rng = self._draws()
        if not self.donors or rng.random() >= self.probability:
            return label
        donor, box_index = rng.choice(self.donors)
        donor_image = self.dataset.load_image(donor)[0]
        dh, dw = donor_image.shape[:2]
        cx, cy, bw, bh = self.dataset.labels[donor]["bboxes"][box_index]
        x0, y0 = max(0, round((cx - bw / 2) * dw)), max(0, round((cy - bh / 2) * dh))
        x1, y1 = min(dw, round((cx + bw / 2) * dw)), min(dh, round((cy + bh / 2) * dh))
        crop = donor_image[y0:y1, x0:x1]
        image = label["img"]
        h, w = image.shape[:2]
        ch, cw = crop.shape[:2]
        if ch == 0 or cw == 0 or ch >= h or cw >= w:
            return label
        px, py = rng.randrange(0, w - cw), rng.randrange(0, h - ch)
        image[py:py + ch, px:px + cw] = crop
        instances = label["instances"]
        instances.convert_bbox("xywh")
        if not instances.normalized:
            instances.normalize(w, h)
        pasted = np.array([[(px + cw / 2) / w, (py + ch / 2) / h, cw / w, ch / h]],
                          dtype=np.float32)
        Instances = type(instances)
        label["instances"] = Instances(np.concatenate([instances.bboxes, pasted]),
                                       bbox_format="xywh", normalized=True)
        donor_class = self.dataset.labels[donor]["cls"].reshape(-1)[box_index]
        label["cls"] = np.concatenate([label["cls"].reshape(-1, 1),
                                       np.array([[donor_class]], dtype=label["cls"].dtype)])
        return label


def rescale_batch(batch: dict, scales: tuple[int, ...], rng: random.Random) -> dict:
    """Multi-scale training: the whole batch at one size drawn from ``scales`` (square, as the
    letterboxed inputs are); labels are normalised, so only the pixels change."""
    if scales:
        size = rng.choice(scales)
        batch["img"] = F.interpolate(batch["img"], size=(size, size), mode="bilinear",
                                     align_corners=False)
    return batch


def make_trainer(config: DetectConfig) -> type:
    """An ultralytics DetectionTrainer with our additions, as ``config`` switches them."""
    ultralytics_modules()  # offline set-up before the first ultralytics import
    from ultralytics.data.build import InfiniteDataLoader
    from ultralytics.models.yolo.detect import DetectionTrainer

    scale_rng = random.Random(config.seed)
    scales = tuple(config.scales)  # empty: the fixed image size

    def use_focal_loss(trainer) -> None:  # noqa: ANN001
        # Set on the training model only: the EMA copy that checkpoints save stays a plain
        # ultralytics DetectionModel, which the workers load without this package.
        criterion = trainer.model.init_criterion()
        criterion.bce = FocalBCE(config.focal_gamma, config.focal_alpha)
        trainer.model.criterion = criterion

    def train_channels_last(trainer) -> None:  # noqa: ANN001
        # Channels-last convolutions train faster on a CPU (oneDNN; YOLO11n at 192 px, batch 16,
        # one thread of a 2-core AMD EPYC: 0.52 -> 0.41 s a step); ultralytics does it itself
        # on a GPU only. The training model, as preprocess_batch's images: the EMA copy, which
        # validation runs, was made before and keeps its layout (checkpoints are saved
        # contiguous by ultralytics in any case).
        trainer.model.to(memory_format=torch.channels_last)

    class SpineTrainer(DetectionTrainer):
        def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            if config.focal_gamma is not None:  # None: plain BCE
                self.add_callback("on_train_start", use_focal_loss)
            self.add_callback("on_train_start", train_channels_last)

        def build_dataset(self, img_path, mode="train", batch=None):  # noqa: ANN001, ANN202
            dataset = super().build_dataset(img_path, mode, batch)
            if mode == "train" and config.copy_paste > 0:
                paste = MinorityCopyPaste(dataset, config.copy_paste,
                                          config.copy_paste_below, config.seed)
                load = dataset.get_image_and_label
                dataset.get_image_and_label = lambda index: paste(load(index))
            return dataset

        def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):  # noqa: ANN001, ANN202
            if mode != "train" or not config.balanced_sampling:
                return super().get_dataloader(dataset_path, batch_size, rank, mode)
            dataset = self.build_dataset(dataset_path, mode, batch_size)
            classes = [set(label["cls"].reshape(-1).astype(int).tolist())
                       for label in dataset.labels]
            weights = torch.as_tensor(balanced_weights(classes), dtype=torch.double)
            sampler = WeightedRandomSampler(
                weights, num_samples=len(dataset), replacement=True,
                generator=torch.Generator().manual_seed(config.seed))
            return InfiniteDataLoader(dataset=dataset, batch_size=min(batch_size, len(dataset)),
                                      sampler=sampler, num_workers=config.loader_workers,
                                      collate_fn=dataset.collate_fn)

        def preprocess_batch(self, batch: dict) -> dict:
            batch = rescale_batch(super().preprocess_batch(batch), scales, scale_rng)
            batch["img"] = batch["img"].contiguous(memory_format=torch.channels_last)
            return batch

    return SpineTrainer


def saved_epoch(last: Path) -> int | None:
    """The 0-based epoch LAST holds; -1 once the run finished (ultralytics then strips the
    optimiser and sets it so); None without a readable checkpoint."""
    if not last.exists():
        return None
    try:
        checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 (cut short while written: start that run again)
        return None
    return checkpoint.get("epoch", -1)


def training_state(last: Path) -> str:
    """``none``, ``partial`` (resumable) or ``finished``."""
    epoch = saved_epoch(last)
    return "none" if epoch is None else "finished" if epoch == -1 else "partial"


def drop_unsaved_epochs(results: Path, epoch: int) -> None:
    """Keep RESULTS' rows up to the checkpoint's EPOCH (0-based). Ultralytics writes an epoch's
    row before its checkpoint, so a run stopped between the two would otherwise list that epoch
    twice once resumed."""
    if not results.exists():
        return
    header, *rows = results.read_text().splitlines(keepends=True)
    kept = [row for row in rows if int(float(row.split(",")[0])) <= epoch + 1]
    results.write_text("".join([header, *kept]))


def train_detector(run: Path, training: DetectConfig, device: str = "cpu",
                   name: str = "train",
                   callbacks: Mapping[str, Callable[[object], None]] | None = None) -> Path:
    """Train on RUN/yolo/data.yaml into RUN/detect/NAME; return the best checkpoint. A finished
    run is not trained again; an interrupted one resumes from its last epoch. ``callbacks``:
    more ultralytics callbacks (each called with the trainer), by event."""
    prepare_offline(run / "ultralytics")
    ultralytics_modules()
    from ultralytics import YOLO

    weights = run / "detect" / name / "weights"
    epoch = saved_epoch(weights / "last.pt")
    if epoch == -1:
        return weights / "best.pt"
    partial = epoch is not None
    if partial:
        drop_unsaved_epochs(run / "detect" / name / "results.csv", epoch)
    model = YOLO(str(weights / "last.pt") if partial
                 else f"yolo11{training.scale}.yaml")
    model.add_callback("on_fit_epoch_end",
                       lambda trainer: tqdm.write(detector_epoch_line(trainer)))
    for event, callback in (callbacks or {}).items():
        model.add_callback(event, callback)
    if not partial and training.init_weights is not None:  # a resumed run has its own start
        record_start(run / "detect", training.init_weights, f"yolo11{training.scale}")
        model.load(str(training.init_weights))
    model.train(
        trainer=make_trainer(training), data=str(run / "yolo" / "data.yaml"),
        resume=str(weights / "last.pt") if partial else False,
        epochs=training.epochs, imgsz=training.image_size, batch=training.batch,
        nbs=training.nominal_batch, optimizer="SGD", lr0=training.lr0, cos_lr=True,
        momentum=training.momentum, weight_decay=training.weight_decay,
        warmup_epochs=training.warmup_epochs, box=training.box, cls=training.cls,
        dfl=training.dfl, mosaic=training.mosaic, hsv_h=training.hsv[0],
        hsv_s=training.hsv[1], hsv_v=training.hsv[2], fliplr=training.fliplr,
        copy_paste=0.0, device=device, amp=device != "cpu", workers=training.loader_workers,
        project=str(run / "detect"), name=name, exist_ok=True, plots=False,
        seed=training.seed, deterministic=True, verbose=False,
    )
    return weights / "best.pt"
