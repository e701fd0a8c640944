"""``spinenode train ablate``: the paper's detection ablation tables, each row a detector
retrained on the run with settings changed, every row scored the same way: COCOeval on the
test split, normal images included, boxes down to score 0.001.

- additions (cumulative): baseline (no augmentation, plain BCE, uniform sampling) -> + standard
  augmentation (mosaic, HSV, flip, multi-scale) -> + class-balanced sampling -> + minority
  copy-paste -> + focal loss (all of the method's additions). The paper's mixup row is left
  out: mixup is not part of the method it describes.
- focal loss: (gamma, alpha) = (0, .25), (1, .25), (2, .25), (3, .25), (2, .5).
- training scales: the fixed image size, the middle three of the configured set, all of it.

Rows with identical settings train once (RUN/detect/ablation-<hash>); a finished row is not
trained again and an interrupted one resumes, as ``train detect`` does.
Writes RUN/ablation.json and RUN/report/ablation.md.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from training.config import DetectConfig, torch_device
from training.dataset_index import DatasetIndex
from training.detect import train_detector
from training.evaluate import MAP_CONFIDENCE, coco_evaluate
from workers.bundle import VINDR_CLASSES, load_bundle
from workers.detector import Detector
from workers.offline import prepare_offline

TABLES = ("additions", "focal", "scales")


def ablation_rows(config: DetectConfig) -> dict[str, list[tuple[str, DetectConfig]]]:
    """Table -> [(row label, detector settings)], derived from the configured detector."""
    gamma = config.focal_gamma if config.focal_gamma is not None else 2.0
    paste = config.copy_paste or 0.2
    baseline = config.model_copy(update={
        "mosaic": 0.0, "hsv": (0.0, 0.0, 0.0), "fliplr": 0.0, "scales": [],
        "balanced_sampling": False, "copy_paste": 0.0, "focal_gamma": None})
    standard = baseline.model_copy(update={
        "mosaic": config.mosaic, "hsv": config.hsv, "fliplr": config.fliplr,
        "scales": config.scales})
    balanced = standard.model_copy(update={"balanced_sampling": True})
    pasted = balanced.model_copy(update={"copy_paste": paste})
    method = pasted.model_copy(update={"focal_gamma": gamma})
    scales = sorted(config.scales)
    middle = scales[max(0, len(scales) // 2 - 1):len(scales) // 2 + 2]
    return {
        "additions": [("baseline (no augmentation)", baseline),
                      ("+ standard augmentation", standard),
                      ("+ class-balanced sampling", balanced),
                      (f"+ minority copy-paste (p={paste})", pasted),
                      (f"+ focal loss (gamma={gamma}, alpha={config.focal_alpha})", method)],
        "focal": [(f"gamma={g}, alpha={a}",
                   method.model_copy(update={"focal_gamma": g, "focal_alpha": a}))
                  for g, a in ((0.0, 0.25), (1.0, 0.25), (2.0, 0.25), (3.0, 0.25), (2.0, 0.5))],
        "scales": [(f"fixed {config.image_size} px",
                    method.model_copy(update={"scales": []})),
                   ("{" + ", ".join(map(str, middle)) + "} px",
                    method.model_copy(update={"scales": middle})),
                   ("{" + ", ".join(map(str, scales)) + "} px", method)],
    }


def _key(settings: DetectConfig) -> str:
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:12]


def score_detector(run: Path, bundle: Path, weights: Path, device: torch.device) -> dict:
    """COCOeval of one checkpoint on the run's test split, on the prepared (cached) images the
    detector was trained from; boxes scaled back to the original pixels."""
    detector = Detector(load_bundle(bundle), device, weights=weights)
    ground_truth, detections, sizes = [], [], {}
    for image in DatasetIndex.read(run).split("test"):
        cached = np.load(image.cache_file(run)).astype(np.float32)
        sy, sx = image.rows / cached.shape[0], image.columns / cached.shape[1]
        sizes[image.image_id] = (image.rows, image.columns)
        ground_truth += [{"image_id": image.image_id,
                          "class_index": VINDR_CLASSES.index(name), "box": box}
                         for name, *box in image.boxes]
        detections += [{"image_id": image.image_id, "class_index": b.class_index,
                        "score": b.score, "box": [b.x0 * sx, b.y0 * sy, b.x1 * sx, b.y1 * sy]}
                       for b in detector.detect([cached], MAP_CONFIDENCE)[0]]
    return coco_evaluate(ground_truth, detections, sizes)


def rare_classes(run: Path, below: float) -> list[str]:
    """Classes under ``below`` of the training split's boxes (the copy-paste criterion)."""
    names = [box[0] for i in DatasetIndex.read(run).split("train") for box in i.boxes]
    return [c for c in VINDR_CLASSES if 0 < names.count(c) < below * max(len(names), 1)]


def ablate(run: Path, config: DetectConfig, bundle: Path, device: str = "cpu",
           tables: tuple[str, ...] = TABLES) -> dict:
    prepare_offline(run / "ultralytics")
    target = torch_device(device)
    rare = rare_classes(run, config.copy_paste_below)
    scored: dict[str, dict] = {}
    result: dict = {"rare_classes": rare, "tables": {}}
    for table, rows in ablation_rows(config).items():
        if table not in tables:
            continue
        result["tables"][table] = []
        for label, settings in rows:
            key = _key(settings)
            if key not in scored:
                weights = train_detector(run, settings, device=device, name=f"ablation-{key}")
                coco = score_detector(run, bundle, weights, target)
                rare_ap = [coco["ap50"][c] for c in rare if coco["ap50"][c] is not None]
                scored[key] = {
                    "map50": coco["map50"], "map50_95": coco["map50_95"],
                    "map_small": coco["map_small"], "map_large": coco["map_large"],
                    "rare_ap50": float(np.mean(rare_ap)) if rare_ap else None,
                    "ap50": coco["ap50"]}
            result["tables"][table].append({"row": label, "run": f"ablation-{key}",
                                            **scored[key]})
    (run / "ablation.json").write_text(json.dumps(result, indent=1))
    write_ablation_report(run / "report" / "ablation.md", result, config)
    return result


def write_ablation_report(path: Path, result: dict, config: DetectConfig) -> None:
    titles = {"additions": "Detection: the method's additions, cumulative",
              "focal": "Focal loss parameters", "scales": "Training scales"}
    rare = ", ".join(result["rare_classes"]) or "none"
    lines = ["# Detection ablations (our own measured numbers)", "",
             f"YOLO11-{config.scale}, {config.image_size} px, {config.epochs} epochs per row; "
             "COCOeval on the test split, normal images included. AP small/large: "
             "mAP@0.5:0.95 over COCO's area ranges (in original pixels). Rare classes (under "
             f"{config.copy_paste_below:.0%} of the training boxes): {rare}.", ""]
    for table, rows in result["tables"].items():
        lines += [f"## {titles[table]}", "",
                  "| configuration | mAP@0.5 | mAP@0.5:0.95 | AP small | AP large | rare AP@0.5 | "
                  + " | ".join(f"{name} AP@0.5" for name in VINDR_CLASSES) + " |",
                  "|---" * (6 + len(VINDR_CLASSES)) + "|"]
        for row in rows:
            values = [row["map50"], row["map50_95"], row["map_small"], row["map_large"],
                      row["rare_ap50"], *[row["ap50"][c] for c in VINDR_CLASSES]]
            lines.append(f"| {row['row']} | " + " | ".join(_fmt(v) for v in values) + " |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _fmt(value: float | None) -> str:
    return "-" if value is None or value < 0 else f"{value:.4f}"
