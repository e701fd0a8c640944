"""DERNet training: each member, 5-fold stratified cross-validation on the prepared run, then
the ensemble's weights (grid search on out-of-fold AUROC) and threshold (Youden's J on the same
out-of-fold predictions: validation only, never test).

RUN/classify/<member>/fold<k>.pt   best state per fold (by validation AUROC)
RUN/classify/<member>/fold<k>.json that fold's result: an interrupted run resumes at the next fold
RUN/classify/<member>/cv.json      per fold: best epoch and AUROC; out-of-fold probabilities
RUN/ensemble.json                  weights, threshold, out-of-fold AUROC per member and ensemble
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training.augment import augment
from training.config import ClassifyConfig, TrainingConfig
from training.dataset_index import DatasetIndex, IndexedImage
from training.init_weights import member_start, record_start
from training.metrics import auroc, ensemble_weight_search, youden_threshold
from training.progress import Epoch, EpochLog
from workers.bundle import IMAGENET_MEAN, IMAGENET_STD, TTA_NAMES
from workers.dernet import autocast, ensemble_mean, resize_and_normalise, tta_views
from workers.runtime import cpu_has_native_bfloat16

CPU = torch.device("cpu")


class TrainingStopped(Exception):
    """A caller's ``stop`` asked training to end (the demo's, when its detector failed)."""


class CachedImages(Dataset):
    def __init__(self, run: Path, items: list[IndexedImage], size: int, train: bool, seed: int):
        self.run, self.items, self.size, self.train, self.seed = run, items, size, train, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[index]
        cached = np.load(item.cache_file(self.run)).astype(np.float32)
        image = torch.from_numpy(cached)[None]
        if self.train:
            # Seeded per (epoch seed, item): the same augmentation whichever loader worker
            # draws it (a generator shared at fork would repeat itself in every worker).
            image = augment(image, torch.Generator().manual_seed(self.seed * 1_000_003 + index))
        inputs = resize_and_normalise(image, self.size, IMAGENET_MEAN, IMAGENET_STD)
        return inputs, torch.tensor(float(item.abnormal))


def _size_at(config: ClassifyConfig, architecture: str, epoch: int) -> int:
    if architecture != "tf_efficientnetv2_s":
        return config.input_size
    stages = config.progressive_sizes
    return stages[min(epoch * len(stages) // config.epochs, len(stages) - 1)]


def training_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype:
    """bfloat16 autocast where the hardware computes it natively (about 1.7x faster training
    on this CPU), else float32. Weights, optimiser and loss stay float32; validation and the
    exported members are evaluated in float32."""
    if not mixed_precision:
        return torch.float32
    native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
              else cpu_has_native_bfloat16())
    return torch.bfloat16 if native else torch.float32


def _to(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    return inputs.to(device, memory_format=torch.channels_last, non_blocking=True)


VIEWS_PER_PASS = 40


@torch.inference_mode()
def predict(model: torch.nn.Module, run: Path, items: list[IndexedImage], size: int,
            tta: list[str], device: torch.device = CPU, workers: int = 0) -> np.ndarray:
    """Probabilities in float32, mean over the TTA views (as the workers compute them)."""
    model.eval()
    # About 40 views a forward pass, however many views an image has: 8 single views at once
    # took a fifth longer a view than 40 (ResNet-50 and EfficientNetV2-S at 96 px, one thread).
    loader = DataLoader(CachedImages(run, items, size, train=False, seed=0),
                        batch_size=max(1, VIEWS_PER_PASS // len(tta)), num_workers=workers)
    out = []
    for inputs, _ in loader:
        logits = model(_to(tta_views(inputs, tta), device)).view(len(inputs), len(tta))
        out.append(torch.sigmoid(logits.float()).mean(dim=1).cpu())
    return torch.cat(out).numpy()


def train_fold(run: Path, architecture: str, train_items: list[IndexedImage],
               val_items: list[IndexedImage],
               config: ClassifyConfig, seed: int,
               device: torch.device = CPU,
               progress: EpochLog | None = None,
               stop: Callable[[], bool] | None = None) -> tuple[torch.nn.Module, dict, dict]:
    """(the model holding its best state, that state on the CPU, best epoch and AUROC); each
    epoch's numbers go to PROGRESS. ``stop`` is asked before each batch: where it says so,
    TrainingStopped ends the training (nothing of the fold is kept)."""
    torch.manual_seed(seed)
    model = member_start(architecture, config.init_weights.get(architecture)).to(
        device, memory_format=torch.channels_last)
    dtype = training_dtype(device, config.mixed_precision)
    # Fused: one kernel for all of a step's updates (ResNet-50 on one CPU thread: 68 -> 14 ms).
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    batch = (config.batch_size_efficientnet if architecture == "tf_efficientnetv2_s"
             else config.batch_size)
    labels = np.array([item.abnormal for item in val_items])
    best = {"auroc": -math.inf, "epoch": -1, "state": None}
    # Without validation images (a final member on all of train) every epoch runs and the
    # last one is kept.
    validate = bool(val_items)
    for epoch in range(config.epochs):
        started, losses, seen = time.monotonic(), [], 0
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        loader = DataLoader(CachedImages(run, train_items, _size_at(config, architecture, epoch),
                                         train=True, seed=seed * 1000 + epoch),
                            batch_size=batch, shuffle=True, drop_last=len(train_items) > batch,
                            generator=torch.Generator().manual_seed(seed + epoch),
                            num_workers=config.loader_workers)
        for inputs, targets in loader:
            if stop is not None and stop():
                raise TrainingStopped(f"{architecture}: stopped in epoch {epoch + 1}")
            optimizer.zero_grad()
            with autocast(device, dtype):
                logits = model(_to(inputs, device)).view(-1).float()
            loss = loss_fn(logits, targets.to(device))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()) * len(targets))
            seen += len(targets)
        train_seconds = time.monotonic() - started
        scheduler.step()
        if validate:
            probabilities = predict(model, run, val_items, config.input_size, ["identity"],
                                    device, config.loader_workers)
            score = auroc(labels, probabilities) if 0 < labels.sum() < len(labels) else 0.5
        else:
            score = math.nan
        if not validate or score > best["auroc"]:
            best = {"auroc": score if validate else -math.inf, "epoch": epoch,
                    "state": {k: v.detach().cpu().clone().contiguous()
                              for k, v in model.state_dict().items()}}
        if progress is not None:
            progress.add(Epoch(epoch + 1, sum(losses) / max(seen, 1), score, lr,
                               seen / max(train_seconds, 1e-9),
                               time.monotonic() - started), (best["auroc"], best["epoch"] + 1))
        if validate and epoch - best["epoch"] >= config.patience:
            break  # early stopping
    model.load_state_dict(best["state"])
    return model, best["state"], {"best_epoch": best["epoch"], "val_auroc": best["auroc"]}


def cross_validate(run: Path, config: TrainingConfig, device: torch.device = CPU,
                   fold_bars: bool = True,
                   stop: Callable[[], bool] | None = None) -> dict[str, dict]:
    """Each member on each fold; ``fold_bars``: a progress bar over each member's folds (not
    where another process prints to the same terminal: it would break into its lines);
    ``stop``: as train_fold takes it (the folds finished so far are kept and resume)."""
    train = DatasetIndex.read(run).split("train")
    folds = sorted({image.fold for image in train if image.fold is not None})
    results = {}
    for architecture in config.classify.members:
        folder = run / "classify" / architecture
        folder.mkdir(parents=True, exist_ok=True)
        summary_path = folder / "cv.json"
        if summary_path.exists():  # resumable: a finished member is not trained again
            results[architecture] = json.loads(summary_path.read_text())
            continue
        record_start(folder, config.classify.init_weights.get(architecture), architecture)
        oof: dict[str, float] = {}
        per_fold = []
        for fold in tqdm(folds, desc=architecture, unit="fold", disable=not fold_bars):
            done = folder / f"fold{fold}.json"  # written after its weights: the fold is whole
            if done.exists():
                saved = json.loads(done.read_text())
                oof.update(saved["oof"])
                per_fold.append(saved["info"])
                continue
            train_items = [i for i in train if i.fold != fold]
            val_items = [i for i in train if i.fold == fold]
            progress = EpochLog(folder / f"fold{fold}.metrics.csv",
                                f"{architecture} fold {fold}", config.classify.epochs)
            model, state, info = train_fold(run, architecture, train_items, val_items,
                                            config.classify, seed=config.classify.seed + fold,
                                            device=device, progress=progress, stop=stop)
            torch.save(state, folder / f"fold{fold}.pt")
            probabilities = predict(model, run, val_items, config.classify.input_size,
                                    list(TTA_NAMES), device, config.classify.loader_workers)
            fold_oof = dict(zip((i.image_id for i in val_items), map(float, probabilities),
                                strict=True))
            oof.update(fold_oof)
            per_fold.append({"fold": fold, **info})
            done.write_text(json.dumps({"info": per_fold[-1], "oof": fold_oof}))
        best_fold = max(per_fold, key=lambda f: f["val_auroc"])["fold"]
        results[architecture] = {"folds": per_fold, "best_fold": best_fold, "oof": oof}
        summary_path.write_text(json.dumps(results[architecture], indent=1))
    return results


def train_final_members(run: Path, config: TrainingConfig,
                        device: torch.device = CPU) -> dict[str, dict]:
    """The paper's final models: each member trained again on all of train, for the median of
    its folds' best epoch counts (cross-validation chose the epochs). RUN/classify/<member>/
    final.pt and final.json; resumable like the folds."""
    train = DatasetIndex.read(run).split("train")
    results = {}
    for architecture in config.classify.members:
        folder = run / "classify" / architecture
        done = folder / "final.json"
        if done.exists():
            results[architecture] = json.loads(done.read_text())
            continue
        cv = json.loads((folder / "cv.json").read_text())
        epochs = max(1, round(float(np.median([f["best_epoch"] + 1 for f in cv["folds"]]))))
        member_config = config.classify.model_copy(update={"epochs": epochs})
        progress = EpochLog(folder / "final.metrics.csv", f"{architecture} final", epochs)
        _, state, _ = train_fold(run, architecture, train, [], member_config,
                                 seed=config.classify.seed + 1000, device=device,
                                 progress=progress)
        torch.save(state, folder / "final.pt")
        results[architecture] = {"epochs": epochs, "images": len(train),
                                 "fold_best_epochs": [f["best_epoch"] + 1 for f in cv["folds"]]}
        done.write_text(json.dumps(results[architecture], indent=1))
    return results


def fit_ensemble(run: Path, config: TrainingConfig) -> dict:
    results = {name: json.loads((run / "classify" / name / "cv.json").read_text())
               for name in config.classify.members}
    train = DatasetIndex.read(run).split("train")
    labels = np.array([image.abnormal for image in train])
    scores = {name: np.array([result["oof"][image.image_id] for image in train])
              for name, result in results.items()}
    weights, ensemble_auroc = ensemble_weight_search(labels, scores, config.classify.weight_step)
    combined = ensemble_mean(scores, weights)
    threshold = youden_threshold(labels, combined)
    summary = {
        "weights": weights, "threshold": threshold, "oof_auroc": ensemble_auroc,
        "member_oof_auroc": {name: auroc(labels, s) for name, s in scores.items()},
        "best_folds": {name: result["best_fold"] for name, result in results.items()},
    }
    (run / "ensemble.json").write_text(json.dumps(summary, indent=1))
    return summary
