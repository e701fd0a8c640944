"""What a person watching a training run sees: one line per epoch and a CSV per member fold.

The line (on stdout, between tqdm's bars) says loss, validation score, learning rate, images
per second and the time left if every remaining epoch ran (early stopping may end sooner); the
CSV has the same numbers for the report's curves.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

COLUMNS = ("epoch", "train_loss", "val_auroc", "lr", "images_per_s", "seconds")


@dataclass(frozen=True)
class Epoch:
    epoch: int  # 1-based
    train_loss: float
    val_auroc: float
    lr: float
    images_per_s: float
    seconds: float


class EpochLog:
    """Writes CSV (from scratch: a fold is trained whole or again) and prints each epoch."""

    def __init__(self, csv_path: Path, label: str, epochs: int):
        self.path, self.label, self.epochs = csv_path, label, epochs
        self.started = time.monotonic()
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as file:
            csv.writer(file).writerow(COLUMNS)

    def add(self, epoch: Epoch, best: tuple[float, int]) -> None:
        with open(self.path, "a", newline="") as file:
            csv.writer(file).writerow([f"{v:.6g}" if isinstance(v, float) else v
                                       for v in asdict(epoch).values()])
        elapsed = time.monotonic() - self.started
        left = elapsed / epoch.epoch * (self.epochs - epoch.epoch)
        validation = ("no validation" if math.isnan(epoch.val_auroc)  # a final member
                      else f"val AUROC {epoch.val_auroc:.4f} (best {best[0]:.4f} @{best[1]})")
        tqdm.write(f"{self.label} epoch {epoch.epoch}/{self.epochs}: loss "
                   f"{epoch.train_loss:.4f}, {validation}, lr {epoch.lr:.2e}, "
                   f"{epoch.images_per_s:.1f} img/s, {epoch.seconds:.1f} s, "
                   f"at most {_duration(left)} left")


def detector_epoch_line(trainer) -> str:  # noqa: ANN001 - an ultralytics DetectionTrainer
    """The detector's epoch, as the members' (ultralytics' own results.csv is its CSV)."""
    epoch, epochs = trainer.epoch + 1, trainer.epochs
    scores = (f"val mAP@0.5 {trainer.metrics.get('metrics/mAP50(B)', 0.0):.4f}, mAP@0.5:0.95 "
              f"{trainer.metrics.get('metrics/mAP50-95(B)', 0.0):.4f}")
    if epoch > epochs:  # ultralytics' final validation of the best weights reports as one more
        return f"detector best weights: {scores}"
    losses = trainer.label_loss_items(trainer.tloss)
    loss = ", ".join(f"{name.split('/')[-1].removesuffix('_loss')} {value:.4f}"
                     for name, value in losses.items())
    seconds = trainer.epoch_time or 0.0
    images = len(trainer.train_loader.dataset)
    elapsed = time.time() - trainer.train_time_start
    left = elapsed / max(epoch - trainer.start_epoch, 1) * (epochs - epoch)
    return (f"detector epoch {epoch}/{epochs}: loss {loss}, {scores}, lr "
            f"{trainer.lr.get('lr/pg0', 0.0):.2e}, {images / max(seconds, 1e-9):.1f} img/s, "
            f"{seconds:.1f} s, at most {_duration(left)} left")


def read(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
