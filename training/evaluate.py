"""``spinenode train evaluate``: the exported bundle on the test split, through the workers'
own code path (decode -> DERNet -> YOLO11), with VinDr-SpineXR's protocol for detection:
pycocotools COCOeval over the whole test set, normal images included.

Writes RUN/evaluation.json and RUN/report/ (report.md, roc.png, pr.png, threshold.png).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from dicom_node.config import load_settings
from training.metrics import auroc, binary_report
from training.phantoms import read_bands
from training.progress import read as read_epochs
from training.vindr import read_split
from workers.bundle import VINDR_CLASSES
from workers.dernet import DERNet, ensemble_mean
from workers.imaging import decode
from workers.runtime import runtime_for


def coco_evaluate(ground_truth: list[dict], detections: list[dict],
                  sizes: dict[str, tuple[int, int]]) -> dict:
    """mAP@0.5, mAP@0.5:0.95 and per-class AP@0.5 (101-point, maxDets 100) with COCOeval.

    ``ground_truth``/``detections``: {"image_id", "class_index", "box": [x0, y0, x1, y1]}
    (+ "score" for detections). Every image in ``sizes`` counts, with or without boxes.
    """
    ids = {image_id: index for index, image_id in enumerate(sorted(sizes), start=1)}
    coco = COCO()
    coco.dataset = {
        "images": [{"id": ids[i], "height": h, "width": w} for i, (h, w) in sizes.items()],
        "categories": [{"id": k, "name": name} for k, name in enumerate(VINDR_CLASSES)],
        "annotations": [
            {"id": n, "image_id": ids[g["image_id"]], "category_id": g["class_index"],
             "bbox": _xywh(g["box"]), "area": _area(g["box"]), "iscrowd": 0}
            for n, g in enumerate(ground_truth, start=1)],
    }
    results = [{"image_id": ids[d["image_id"]], "category_id": d["class_index"],
                "bbox": _xywh(d["box"]), "score": d["score"]} for d in detections]
    # pycocotools prints its progress and tables; the report holds what matters of them.
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        found = coco.loadRes(results) if results else COCO()
        if not results:
            found.dataset = {"images": coco.dataset["images"], "categories":
                             coco.dataset["categories"], "annotations": []}
            found.createIndex()
        evaluator = COCOeval(coco, found, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [iou, recall, class, area, maxdets]
    per_class = {}
    for k, name in enumerate(VINDR_CLASSES):
        curve = precision[0, :, k, 0, 2]
        per_class[name] = float(curve[curve > -1].mean()) if (curve > -1).any() else None
    small, large = float(evaluator.stats[3]), float(evaluator.stats[5])  # -1: none that size
    return {"map50": float(evaluator.stats[1]), "map50_95": float(evaluator.stats[0]),
            "map_small": small if small >= 0 else None, "map_large": large if large >= 0 else None,
            "ap50": per_class, "pr_curves": precision[0, :, :, 0, 2].tolist()}


def _xywh(box: list[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _area(box: list[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / (_area(a) + _area(b) - inter) if inter else 0.0


def precision_recall(ground_truth: list[dict], detections: list[dict],
                     iou: float = 0.5) -> dict[str, dict[str, float | None]]:
    """Per class at the operating point: greedy matching by score at IoU >= ``iou``."""
    out = {}
    for k, name in enumerate(VINDR_CLASSES):
        truths = [g for g in ground_truth if g["class_index"] == k]
        found = sorted((d for d in detections if d["class_index"] == k),
                       key=lambda d: -d["score"])
        used: set[int] = set()
        tp = 0
        for d in found:
            best, best_iou = None, iou
            for n, g in enumerate(truths):
                if n not in used and g["image_id"] == d["image_id"]:
                    overlap = _iou(d["box"], g["box"])
                    if overlap >= best_iou:
                        best, best_iou = n, overlap
            if best is not None:
                used.add(best)
                tp += 1
        out[name] = {"precision": tp / len(found) if found else None,
                     "recall": tp / len(truths) if truths else None}
    return out


# mAP integrates the whole precision-recall curve, so boxes are kept down to this score (as
# COCO evaluations and ultralytics' validator do); the bundle's own confidence is the operating
# point for precision and recall.
MAP_CONFIDENCE = 0.001


def evaluate(run: Path, data: Path, bundle: Path) -> dict:
    runtime = runtime_for(load_settings(data_dir=run, bundle=bundle))
    operating = runtime.bundle.manifest.detector.confidence
    records = read_split(data, "test")
    spec = runtime.bundle.manifest.classifier
    labels, probabilities, members, views, served_float32 = [], [], {}, {}, []
    # The members in float32 (as training evaluates them) beside a runtime that serves them in
    # a reduced precision, so that the pixel paths compare pixels, not precisions.
    float32 = (runtime.classifier if runtime.classifier.dtype == torch.float32
               else DERNet(runtime.bundle, runtime.device))
    ground_truth, detections, sizes = [], [], {}
    for record in tqdm(records, desc="test images", unit="image"):
        image = decode(record.path)
        (result,) = runtime.analyse([image.pixels], confidence=MAP_CONFIDENCE)
        labels.append(record.abnormal)
        probabilities.append(result.classification.probability)
        served_float32.append(result.classification.probability if float32 is runtime.classifier
                              else float32.classify([image.pixels])[0].probability)
        for name, p in result.classification.member_probabilities.items():
            members.setdefault(name, []).append(p)
        for name, p in result.classification.view_probabilities.items():
            views.setdefault(name, []).append(p)  # for the ensemble ablation's no-TTA row
        sizes[record.image_id] = (image.rows, image.columns)
        ground_truth += [{"image_id": record.image_id, "class_index": b.class_index,
                          "box": [b.x0, b.y0, b.x1, b.y1]} for b in record.boxes]
        detections += [{"image_id": record.image_id, "class_index": b.class_index,
                        "score": b.score, "box": [b.x0, b.y0, b.x1, b.y1]}
                       for b in result.findings]
    labels_array, scores = np.array(labels), np.array(probabilities)
    paths = pixel_path_difference(run, float32, records, np.array(served_float32))
    threshold = runtime.bundle.manifest.classifier.threshold
    report = binary_report(labels_array, scores, threshold)
    member_reports = {name: asdict(binary_report(labels_array, np.array(p), threshold))
                      for name, p in members.items()}
    coco = coco_evaluate(ground_truth, detections, sizes)
    sweep = [asdict(binary_report(labels_array, scores, t, bootstrap=0))
             for t in np.linspace(0.05, 0.95, 19)]
    result = {
        "images": len(records), "abnormal": int(labels_array.sum()),
        "runtime": f"{runtime.device} {runtime.precision}",
        "ultralytics_test_map": ultralytics_map(run, runtime.bundle.manifest.detector.image_size),
        "classification": asdict(report), "members": member_reports,
        "ensemble_ablation": ensemble_ablation(
            labels_array, {name: np.array(v) for name, v in views.items()},
            {m.architecture: m.ensemble_weight for m in spec.members}, list(spec.tta),
            threshold),
        "detection": {key: coco[key] for key in ("map50", "map50_95", "ap50")},
        "pixel_paths": paths,
        "members_served": runtime.bundle.manifest.metrics.get("members", {}),
        "detection_at_operating_point": precision_recall(
            ground_truth, [d for d in detections if d["score"] >= operating]),
        "threshold_sweep": sweep,
        "threshold_table": threshold_table(labels_array, scores, threshold),
        "bands": quality_per_band(read_bands(data, "test"), [r.image_id for r in records],
                                  labels_array, scores, threshold, ground_truth, detections,
                                  sizes),
    }
    (run / "evaluation.json").write_text(json.dumps(result, indent=1))
    write_report(run / "report", result, labels_array, scores, coco["pr_curves"])
    if write_training_curves(run, run / "report" / "curves.png"):
        with open(run / "report" / "report.md", "a") as report:
            report.write("\n## Training curves\n\nPer member and fold: training loss and "
                         "validation AUROC per epoch; the detector: its losses and validation "
                         "mAP@0.5 per epoch.\n\n![training curves](curves.png)\n")
    return result


def quality_per_band(bands: dict[str, str], image_ids: list[str], labels: np.ndarray,
                     scores: np.ndarray, threshold: float, ground_truth: list[dict],
                     detections: list[dict], sizes: dict[str, tuple[int, int]]) -> list[dict]:
    """Classification and detection on each difficulty band of varied phantoms (none for other
    data): a recipe that only fits one look shows it in the hard band."""
    rows = []
    for band in sorted(set(bands.values()), key=["easy", "medium", "hard"].index):
        keep = np.array([bands.get(image_id) == band for image_id in image_ids])
        members = {image_id for image_id, kept in zip(image_ids, keep, strict=True) if kept}
        truth, called = labels[keep].astype(bool), scores[keep] >= threshold
        coco = coco_evaluate([g for g in ground_truth if g["image_id"] in members],
                             [d for d in detections if d["image_id"] in members],
                             {i: sizes[i] for i in members})
        rows.append({"band": band, "images": int(keep.sum()), "abnormal": int(truth.sum()),
                     "auroc": auroc(truth, scores[keep]) if 0 < truth.sum() < len(truth)
                     else None,
                     "sensitivity": float(called[truth].mean()) if truth.any() else None,
                     "specificity": float((~called[~truth]).mean()) if (~truth).any() else None,
                     "map50": coco["map50"] if coco["map50"] >= 0 else None})
    return rows


def write_training_curves(run: Path, target: Path) -> bool:
    """Loss and validation score per epoch, each member fold (RUN/classify/*/fold*.metrics.csv)
    and the detector (ultralytics' RUN/detect/train/results.csv); False when there are none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    members = sorted(run.glob("classify/*/fold*.metrics.csv"))
    detector = run / "detect" / "train" / "results.csv"
    if not members and not detector.exists():
        return False
    figure, (loss_axis, auroc_axis, detector_axis) = plt.subplots(1, 3, figsize=(13, 4))
    for path in members:
        rows = read_epochs(path)
        label = f"{path.parent.name} {path.name.split('.')[0]}"
        epochs = [row["epoch"] for row in rows]
        loss_axis.plot(epochs, [row["train_loss"] for row in rows], label=label)
        auroc_axis.plot(epochs, [row["val_auroc"] for row in rows], label=label)
    loss_axis.set(title="DERNet members: training loss", xlabel="epoch")
    auroc_axis.set(title="DERNet members: validation AUROC", xlabel="epoch")
    if members:
        auroc_axis.legend(fontsize=6)
    if detector.exists():
        with open(detector, newline="") as file:
            rows = [{key.strip(): float(value) for key, value in row.items()}
                    for row in csv.DictReader(file)]
        epochs = [row["epoch"] for row in rows]
        for key in ("train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/mAP50(B)"):
            detector_axis.plot(epochs, [row.get(key, np.nan) for row in rows],
                               label=key.split("/")[-1])
        detector_axis.legend(fontsize=6)
    detector_axis.set(title="detector: losses and validation mAP@0.5", xlabel="epoch")
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return True


# How far the ensemble probability may move between the pixels training saw (the prepare
# cache, resized again) and those serving sees (the full-resolution decode resized once).
PIXEL_PATH_TOLERANCE = 0.02


def pixel_path_difference(run: Path, float32: DERNet, records: list,
                          served: np.ndarray) -> dict:
    """The test images through the training pipeline (RUN's cache, the DataLoader the members
    were validated with) beside serving's pixels (SERVED), both through the ``float32``
    members: the ensemble probability's difference and the decisions that differ at the
    bundle's threshold."""
    from training.classify import predict
    from training.dataset_index import DatasetIndex

    items = {item.image_id: item for item in DatasetIndex.read(run).images}
    ordered = [items[record.image_id] for record in records]
    spec = float32.spec
    members = float32.members
    trained = ensemble_mean({name: predict(model, run, ordered, spec.input_size,
                                           list(spec.tta), float32.device)
                             for name, _, model in members},
                            {name: weight for name, weight, _ in members})
    difference = np.abs(trained - served)
    return {"max_abs_dp": float(difference.max()), "mean_abs_dp": float(difference.mean()),
            "decisions_differ": int(((trained >= spec.threshold)
                                     != (served >= spec.threshold)).sum()),
            "tolerance": PIXEL_PATH_TOLERANCE,
            "within_tolerance": bool(difference.max() <= PIXEL_PATH_TOLERANCE)}


def ensemble_ablation(labels: np.ndarray, views: dict[str, np.ndarray],
                      weights: dict[str, float], tta: list[str], threshold: float) -> list[dict]:
    """The paper's ensemble table: each member alone, uniform weights, the searched weights
    without TTA (identity view only) and with it. ``views``: member -> (images, TTA views).
    F1 at the bundle's threshold throughout."""
    names = list(views)
    with_tta = {name: v.mean(axis=1) for name, v in views.items()}
    identity = {name: v[:, tta.index("identity")] for name, v in views.items()} \
        if "identity" in tta else None

    def row(configuration: str, w: dict[str, float], scores: dict[str, np.ndarray]) -> dict:
        total = sum(w.values())
        combined = ensemble_mean({name: scores[name] for name in names}, w)
        report = binary_report(labels, combined, threshold, bootstrap=0)
        return {"configuration": configuration, "weights": [round(w[n] / total, 2) for n in names],
                "auroc": report.auroc, "f1": report.f1}

    rows = [row(f"{name} only", {n: float(n == name) for n in names}, with_tta) for name in names]
    rows.append(row("uniform ensemble", {n: 1.0 for n in names}, with_tta))
    if identity is not None:
        rows.append(row("DERNet (searched weights), no TTA", weights, identity))
    rows.append(row(f"DERNet + TTA ({len(tta)} views)", weights, with_tta))
    return rows


def threshold_table(labels: np.ndarray, scores: np.ndarray, chosen: float) -> list[dict]:
    """The paper's threshold table: fixed thresholds around the bundle's own (Youden's J on
    validation), each with sensitivity, specificity, F1 and J on the test split."""
    rows = []
    for threshold in sorted({0.3, 0.4, 0.5, 0.6, chosen}):
        report = binary_report(labels, scores, threshold, bootstrap=0)
        rows.append({"threshold": threshold, "chosen": threshold == chosen,
                     "sensitivity": report.sensitivity, "specificity": report.specificity,
                     "f1": report.f1, "youden_j": report.sensitivity + report.specificity - 1})
    return rows


def ultralytics_map(run: Path, image_size: int) -> dict[str, float] | None:
    """Ultralytics' own mAP on the same test images (its preprocessing), for comparison."""
    weights = run / "detect" / "train" / "weights" / "best.pt"
    if not weights.exists():
        return None
    from ultralytics import YOLO  # offline set-up done by runtime_for

    metrics = YOLO(str(weights)).val(data=str(run / "yolo" / "data.yaml"), split="test",
                                     imgsz=image_size, batch=8, device="cpu", plots=False,
                                     verbose=False, project=str(run / "detect"), name="test",
                                     exist_ok=True)
    return {"map50": float(metrics.box.map50), "map50_95": float(metrics.box.map)}


def write_report(folder: Path, result: dict, labels: np.ndarray, scores: np.ndarray,
                 pr_curves: list[list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    order = np.argsort(-scores)
    tpr = np.concatenate([[0], np.cumsum(labels[order]) / max(labels.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(~labels[order]) / max((~labels).sum(), 1)])
    plt.figure(figsize=(4, 4))
    plt.plot(fpr, tpr)
    plt.plot([0, 1], [0, 1], ":", color="grey")
    plt.xlabel("1 - specificity")
    plt.ylabel("sensitivity")
    plt.title(f"ROC, AUROC {result['classification']['auroc']:.3f}")
    plt.tight_layout()
    plt.savefig(folder / "roc.png", dpi=100)
    plt.close()
    recall = np.linspace(0, 1, 101)
    plt.figure(figsize=(5, 4))
    curves = np.array(pr_curves)
    for k, name in enumerate(VINDR_CLASSES):
        if (curves[:, k] > -1).any():
            plt.plot(recall, np.where(curves[:, k] < 0, np.nan, curves[:, k]), label=name)
    plt.xlabel("recall")
    plt.ylabel("precision")
    plt.title("PR per class, IoU 0.5")
    plt.legend(fontsize=6)
    plt.tight_layout()
    plt.savefig(folder / "pr.png", dpi=100)
    plt.close()
    sweep = result["threshold_sweep"]
    plt.figure(figsize=(5, 4))
    for key in ("sensitivity", "specificity", "f1"):
        plt.plot([row["threshold"] for row in sweep], [row[key] for row in sweep], label=key)
    plt.xlabel("threshold")
    plt.legend()
    plt.tight_layout()
    plt.savefig(folder / "threshold.png", dpi=100)
    plt.close()
    c = result["classification"]
    lines = [
        "# Evaluation on the test split (our own measured numbers)", "",
        f"{result['images']} images, {result['abnormal']} abnormal; served as the workers serve "
        f"it ({result['runtime']}: classifier/detector precision where they differ).", "",
        "## Classification (ensemble, threshold from validation)", "",
        "| AUROC (95% CI) | sensitivity | specificity | F1 | threshold |", "|---|---|---|---|---|",
        f"| {c['auroc']:.4f} ({c['auroc_ci'][0]:.4f}-{c['auroc_ci'][1]:.4f}) | "
        f"{c['sensitivity']:.4f} | {c['specificity']:.4f} | {c['f1']:.4f} | "
        f"{c['threshold']:.3f} |", "",
        "## Ensemble members (same threshold)", "",
        *[f"- {name}: {which}" for name, which in result["members_served"].items()], "",
        "| member | AUROC | sensitivity | "
        "specificity | F1 |", "|---|---|---|---|---|",
        *[f"| {n} | {m['auroc']:.4f} | {m['sensitivity']:.4f} | {m['specificity']:.4f} | "
          f"{m['f1']:.4f} |" for n, m in result["members"].items()], "",
        "## Decision threshold (bold: the bundle's, Youden's J on validation)", "",
        "| threshold | sensitivity | specificity | F1 | Youden's J |", "|---|---|---|---|---|",
        *[_threshold_row(row) for row in result["threshold_table"]], "",
        "## Ensemble ablation (F1 at the bundle's threshold)", "",
        f"| configuration | AUROC | F1 | weights ({', '.join(result['members'])}) |",
        "|---|---|---|---|",
        *[f"| {r['configuration']} | {r['auroc']:.4f} | {r['f1']:.4f} | "
          f"{', '.join(f'{w:.2f}' for w in r['weights'])} |"
          for r in result["ensemble_ablation"]], "",
        "## Detection (COCOeval, whole test set incl. normal images)", "",
        f"mAP@0.5 {result['detection']['map50']:.4f}, "
        f"mAP@0.5:0.95 {result['detection']['map50_95']:.4f}"
        + (f" (ultralytics' own validator on the same images: mAP@0.5 "
           f"{result['ultralytics_test_map']['map50']:.4f}, mAP@0.5:0.95 "
           f"{result['ultralytics_test_map']['map50_95']:.4f})"
           if result["ultralytics_test_map"] else ""), "",
        "| class | AP@0.5 | precision | recall |", "|---|---|---|---|",
        *[f"| {n} | {_fmt(ap)} | {_fmt(result['detection_at_operating_point'][n]['precision'])}"
          f" | {_fmt(result['detection_at_operating_point'][n]['recall'])} |"
          for n, ap in result["detection"]["ap50"].items()], "",
        *_band_lines(result["bands"]),
        "## Training pixels vs serving pixels", "",
        _pixel_paths_line(result["pixel_paths"]), "",
        "![ROC](roc.png) ![PR](pr.png) ![threshold sweep](threshold.png)", "",
    ]
    (folder / "report.md").write_text("\n".join(lines))


def _band_lines(bands: list[dict]) -> list[str]:
    if not bands:
        return []
    return ["## Quality per difficulty band (varied phantoms: lesion contrast and size, noise, "
            "exposure)", "",
            "| band | images | abnormal | AUROC | sensitivity | specificity | mAP@0.5 |",
            "|---|---|---|---|---|---|---|",
            *[f"| {b['band']} | {b['images']} | {b['abnormal']} | {_fmt(b['auroc'])} | "
              f"{_fmt(b['sensitivity'])} | {_fmt(b['specificity'])} | {_fmt(b['map50'])} |"
              for b in bands], ""]


def _pixel_paths_line(paths: dict) -> str:
    verdict = "within" if paths["within_tolerance"] else "OUTSIDE"
    return (f"The ensemble probability of each test image from the pixels training used (the "
            f"prepare cache) against the pixels serving used (the decoded "
            f"image through the cache's view), both in float32: max |dp| "
            f"{paths['max_abs_dp']:.4f}, mean "
            f"{paths['mean_abs_dp']:.4f}, {verdict} the tolerance of {paths['tolerance']}; "
            f"{paths['decisions_differ']} decision(s) differ at the threshold. Detection: "
            f"ultralytics' validator (training's pixels) beside ours (serving's) above.")


def _threshold_row(row: dict) -> str:
    mark = "**" if row["chosen"] else ""
    cells = [f"{row['threshold']:.3f}"] + [f"{row[key]:.4f}" for key in
                                           ("sensitivity", "specificity", "f1", "youden_j")]
    return "| " + " | ".join(f"{mark}{cell}{mark}" for cell in cells) + " |"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
