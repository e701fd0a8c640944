"""DERNet cross-validation, ensemble fitting and bundle export, smoke-sized, on phantoms."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.support.node import SPINENODE
from tests.training.test_init_weights import coco_like_detector, imagenet_like
from training.config import load_config
from training.export import reduced_precisions
from training.metrics import youden_threshold
from training.phantoms import generate
from workers.dernet import build_member

TINY = {
    "data": {"cache_size": 96, "folds": 2, "val_fraction": 0.5, "seed": 0},
    "classify": {"members": ["resnet50", "tf_efficientnetv2_s"], "input_size": 32, "epochs": 2,
                 "patience": 2, "batch_size": 8, "batch_size_efficientnet": 8, "lr": 1e-3,
                 "weight_decay": 1e-4, "progressive_sizes": [32, 32], "weight_step": 0.05,
                 "seed": 0,
                 # Export's int8 check and serving int8 members are tests/workers/test_int8.py's:
                 # here they compiled the members twice (export, then load), 3 minutes of CI.
                 "int8": False},
    "detect": {"scale": "n", "image_size": 64, "epochs": 1, "batch": 8, "nominal_batch": 8,
               "warmup_epochs": 0, "scales": [64]},
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SPINENODE, "train", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("classify")
    data = generate(folder / "data", train=24, test=4, height=128, width=96, seed=5)
    # Pretrained starts: ResNet-50 from an ImageNet-shaped file named in the config, the
    # detector from a COCO-shaped one given by flag.
    imagenet_like("resnet50", folder / "resnet50.safetensors")
    coco_like_detector("n", folder / "yolo11n.pt")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "classify": {
        **TINY["classify"], "init_weights": {"resnet50": str(folder / "resnet50.safetensors")}}}))
    run = folder / "run"
    for step in (["prepare", "--data", str(data)], ["classify"], ["ensemble"],
                 ["detect", "--init-weights", str(folder / "yolo11n.pt")],
                 ["export", "--version", "0.0.1-smoke"], ["evaluate", "--data", str(data)],
                 ["ablate", "--table", "scales"]):
        result = _cli(*step, "--out", str(run), "--config", str(config))
        assert result.returncode == 0, result.stderr[-2000:]
        (folder / f"{step[0]}.log").write_text(result.stdout + result.stderr)
    return run, config


def test_training_shows_each_epoch_and_keeps_its_numbers(trained) -> None:
    from training.progress import COLUMNS, read

    run, _ = trained
    classify_log = (run.parent / "classify.log").read_text()
    for member in TINY["classify"]["members"]:
        for fold in (0, 1):
            line = next(line for line in classify_log.splitlines()
                        if line.startswith(f"{member} fold {fold} epoch 1/2: loss "))
            for part in ("val AUROC", "lr ", "img/s", "left"):
                assert part in line, line
            csv_path = run / "classify" / member / f"fold{fold}.metrics.csv"
            assert csv_path.read_text().splitlines()[0] == ",".join(COLUMNS)
            rows = read(csv_path)
            assert [row["epoch"] for row in rows] == [1.0, 2.0][:len(rows)]
            info = json.loads((run / "classify" / member / f"fold{fold}.json").read_text())
            assert max(row["val_auroc"] for row in rows) == pytest.approx(
                info["info"]["val_auroc"], abs=1e-5)
    detect_log = (run.parent / "detect.log").read_text()
    assert "detector epoch 1/1: loss box " in detect_log and "val mAP@0.5 " in detect_log
    assert "detector epoch 2/1" not in detect_log and "detector best weights: " in detect_log
    report = (run / "report" / "report.md").read_text()
    assert "![training curves](curves.png)" in report
    assert (run / "report" / "curves.png").stat().st_size > 10_000


def test_cross_validation_covers_every_training_image_once(trained) -> None:
    run, _ = trained
    images = json.loads((run / "dataset.json").read_text())["images"]
    train_ids = {image["image_id"] for image in images if image["split"] == "train"}
    for member in TINY["classify"]["members"]:
        cv = json.loads((run / "classify" / member / "cv.json").read_text())
        assert set(cv["oof"]) == train_ids
        assert [fold["fold"] for fold in cv["folds"]] == [0, 1]
        model = build_member(member)
        model.load_state_dict(torch.load(run / "classify" / member / f"fold{cv['best_fold']}.pt",
                                         weights_only=True))


def test_ensemble_weights_and_threshold_come_from_validation(trained) -> None:
    run, _ = trained
    summary = json.loads((run / "ensemble.json").read_text())
    weights = summary["weights"]
    assert sum(weights.values()) == pytest.approx(1)
    assert all(round(w / 0.05, 6).is_integer() for w in weights.values())
    images = [i for i in json.loads((run / "dataset.json").read_text())["images"]
              if i["split"] == "train"]
    labels = np.array([image["abnormal"] for image in images])
    combined = sum(
        weight * np.array([json.loads((run / "classify" / name / "cv.json").read_text())
                           ["oof"][image["image_id"]] for image in images])
        for name, weight in weights.items())
    assert summary["threshold"] == pytest.approx(youden_threshold(labels, combined))


def test_classify_resumes_without_retraining(trained) -> None:
    run, config = trained
    summary = run / "classify" / "resnet50" / "cv.json"
    before = summary.stat().st_mtime_ns
    result = _cli("classify", "--out", str(run), "--config", str(config))
    assert result.returncode == 0
    assert summary.stat().st_mtime_ns == before


def test_classify_resumes_an_interrupted_member_at_its_next_fold(trained) -> None:
    run, config = trained
    folder = run / "classify" / "resnet50"
    before = json.loads((folder / "cv.json").read_text())
    # As if stopped during fold 1: fold 0 is whole, fold 1 and the summary are not written.
    for name in ("cv.json", "fold1.json", "fold1.pt"):
        (folder / name).unlink()
    kept = (folder / "fold0.pt").stat().st_mtime_ns
    result = _cli("classify", "--out", str(run), "--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (folder / "fold0.pt").stat().st_mtime_ns == kept  # not trained again
    assert (folder / "fold1.pt").exists()
    after = json.loads((folder / "cv.json").read_text())
    assert after["folds"][0] == before["folds"][0]
    assert set(after["oof"]) == set(before["oof"])


def test_classify_needs_a_prepared_run(tmp_path: Path) -> None:
    result = _cli("classify", "--out", str(tmp_path), "--config", "smoke")
    assert result.returncode == 2
    assert "is not a prepared run" in result.stderr and result.stderr.count("\n") == 1


def test_paper_config_holds_the_papers_settings() -> None:
    config = load_config("paper").classify
    assert (config.lr, config.weight_decay, config.epochs, config.patience) == (1e-4, 1e-4, 60, 10)
    assert (config.batch_size, config.batch_size_efficientnet) == (32, 24)
    assert config.progressive_sizes == [128, 256, 384] and config.input_size == 384


def test_exported_bundle_serves(trained, tmp_path: Path) -> None:
    from dicom_node.config import load_settings
    from workers.bundle import load_bundle
    from workers.runtime import runtime_for

    run, _ = trained
    bundle = load_bundle(run / "bundle")  # checksums verified
    manifest = bundle.manifest
    assert manifest.version == "0.0.1-smoke" and manifest.clinical_use is False
    assert manifest.classifier.source_size == TINY["data"]["cache_size"]
    summary = json.loads((run / "ensemble.json").read_text())
    assert {m.architecture: m.ensemble_weight for m in manifest.classifier.members} == \
        summary["weights"]
    assert manifest.classifier.threshold == summary["threshold"]
    assert manifest.provenance["data_fingerprint"] == json.loads(
        (run / "dataset.json").read_text())["fingerprint"]
    assert manifest.metrics["classification_oof_auroc"] == summary["oof_auroc"]
    # What made it: this machine's libraries and this checkout's commit.
    import importlib.metadata
    import subprocess

    libraries = manifest.provenance["libraries"]
    for name in ("torch", "timm", "ultralytics", "numpy", "pydicom"):
        assert libraries[name] == importlib.metadata.version(name)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    assert manifest.provenance["git_commit"].removesuffix("-dirty") == head
    assert manifest.version_mismatches() == []
    # What it started from: the two files' SHA-256; the EfficientNet started fresh.
    from dicom_node.files import sha256_of

    assert manifest.provenance["init_weights"] == {
        "resnet50": sha256_of(run.parent / "resnet50.safetensors"),
        "detector": sha256_of(run.parent / "yolo11n.pt")}
    # Checked in each reduced precision this machine has (bfloat16 where the CPU has it,
    # float16 on a GPU), each component on its own outputs.
    checks = dict(manifest.metrics.get("precision_check", {}))
    tolerance = checks.pop("tolerance", None)
    assert set(checks) == set(reduced_precisions()) - {"int8"}  # not asked for (TINY)
    validated = manifest.validated_precisions
    assert "int8" not in validated.classifier
    for name, check in checks.items():
        differences = check["differences"]
        assert (name in validated.classifier) == check["passed"]["classifier"] == (
            differences["probability"] <= tolerance["probability"])
        assert (name in validated.detector) == check["passed"]["detector"] == (
            differences["box_px"] <= tolerance["box_px"]
            and differences["score"] <= tolerance["score"])
    runtime = runtime_for(load_settings(data_dir=tmp_path, bundle=run / "bundle"))
    image = np.load(next((run / "cache").glob("*.npy"))).astype(np.float32)
    (result,) = runtime.analyse([image])
    assert 0 <= result.classification.probability <= 1


def test_evaluation_writes_the_report(trained) -> None:
    run, _ = trained
    result = json.loads((run / "evaluation.json").read_text())
    assert result["images"] == 4
    assert result["runtime"].startswith("cpu ") and result["runtime"] in (
        (run / "report" / "report.md").read_text())
    assert 0 <= result["classification"]["auroc"] <= 1
    assert set(result["detection"]["ap50"]) == {
        "Osteophytes", "Surgical implant", "Spondylolysthesis", "Foraminal stenosis",
        "Disc space narrowing", "Vertebral collapse", "Other lesions"}
    assert result["ultralytics_test_map"] is not None
    report = (run / "report" / "report.md").read_text()
    assert f"{result['classification']['auroc']:.4f}" in report
    assert "- resnet50: best cross-validation fold (" in report
    paths = result["pixel_paths"]
    # Serving passes an image through the training cache's view (cached_view) first: both
    # paths see the same pixels, so only float rounding between batch sizes is left.
    assert 0 <= paths["mean_abs_dp"] <= paths["max_abs_dp"] < 1e-4, paths
    assert paths["within_tolerance"] and paths["decisions_differ"] == 0
    assert f"max |dp| {paths['max_abs_dp']:.4f}" in report
    rows = {r["configuration"]: r for r in result["ensemble_ablation"]}
    assert set(rows) == {"resnet50 only", "tf_efficientnetv2_s only", "uniform ensemble",
                         "DERNet (searched weights), no TTA", "DERNet + TTA (5 views)"}
    # the TTA row is the bundle itself, recomputed from the per-view probabilities
    assert rows["DERNet + TTA (5 views)"]["auroc"] == pytest.approx(
        result["classification"]["auroc"])
    assert "## Ensemble ablation" in report and "## Decision threshold" in report
    assert sum(row["chosen"] for row in result["threshold_table"]) == 1
    for plot in ("roc.png", "pr.png", "threshold.png"):
        assert (run / "report" / plot).stat().st_size > 1000


def test_detection_ablation_retrains_each_distinct_row_and_resumes(trained) -> None:
    run, config = trained
    table = json.loads((run / "ablation.json").read_text())["tables"]["scales"]
    # TINY trains at one scale (64): "middle three" and "all" are the same settings, one run
    assert [row["row"] for row in table] == ["fixed 64 px", "{64} px", "{64} px"]
    assert table[1]["run"] == table[2]["run"] != table[0]["run"]
    for row in table:
        assert 0 <= row["map50"] <= 1 and 0 <= row["map50_95"] <= row["map50"] + 1e-9
    weights = [run / "detect" / row["run"] / "weights" / "best.pt" for row in table[:2]]
    before = [w.stat().st_mtime_ns for w in weights]
    result = _cli("ablate", "--table", "scales", "--out", str(run), "--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [w.stat().st_mtime_ns for w in weights] == before  # resumed, nothing retrained
    again = json.loads((run / "ablation.json").read_text())["tables"]["scales"]
    assert [r["map50"] for r in again] == [r["map50"] for r in table]
    assert "## Training scales" in (run / "report" / "ablation.md").read_text()


def test_training_on_a_missing_gpu_is_one_clear_line(trained) -> None:
    run, config = trained
    result = _cli("classify", "--device", "7", "--out", str(run), "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"spinenode: device 7: no such CUDA GPU here ({torch.cuda.device_count()} found)"]


def test_augmentation_does_not_depend_on_the_loader_workers(trained) -> None:
    from torch.utils.data import DataLoader

    from training.classify import CachedImages
    from training.dataset_index import DatasetIndex

    run, _ = trained
    items = DatasetIndex.read(run).split("train")[:8]

    def batches(workers: int, seed: int) -> torch.Tensor:
        dataset = CachedImages(run, items, 32, train=True, seed=seed)
        return torch.cat([inputs for inputs, _ in DataLoader(dataset, batch_size=2,
                                                             num_workers=workers)])

    single = batches(0, seed=3)
    assert torch.equal(single, batches(2, seed=3))
    # and the augmentation is really drawn: items differ from one epoch seed to another
    assert not torch.equal(single, batches(0, seed=4))


def test_final_members_retrain_on_all_of_train(trained, tmp_path: Path) -> None:
    """classify.final_members: retrain: each member trained again on all of train for the
    median of its folds' best epoch counts, and the bundle (and its report) says so."""
    import shutil

    from workers.bundle import load_bundle

    source, config_path = trained
    run = tmp_path / "run"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("bundle", "report"))
    config = yaml.safe_load(config_path.read_text())
    config["classify"]["final_members"] = "retrain"
    retrain = tmp_path / "retrain.yaml"
    retrain.write_text(yaml.safe_dump(config))
    early = _cli("export", "--out", str(run), "--config", str(retrain))
    assert early.returncode == 2 and "run 'spinenode train final' before export" in early.stderr
    result = _cli("final", "--out", str(run), "--config", str(retrain))
    assert result.returncode == 0, result.stderr[-2000:]
    for member in TINY["classify"]["members"]:
        cv = json.loads((run / "classify" / member / "cv.json").read_text())
        final = json.loads((run / "classify" / member / "final.json").read_text())
        best = [fold["best_epoch"] + 1 for fold in cv["folds"]]
        assert final == {"epochs": max(1, round(float(np.median(best)))), "images": 24,
                         "fold_best_epochs": best}
        assert f"{member} final epoch 1/{final['epochs']}: loss " in result.stdout
        assert "no validation" in result.stdout
        state = torch.load(run / "classify" / member / "final.pt", weights_only=True)
        fold = torch.load(run / "classify" / member / f"fold{cv['best_fold']}.pt",
                          weights_only=True)
        assert any(not torch.equal(state[k], fold[k]) for k in state)  # trained anew
    exported = _cli("export", "--out", str(run), "--config", str(retrain))
    assert exported.returncode == 0, exported.stderr[-2000:]
    members = load_bundle(run / "bundle").manifest.metrics["members"]
    assert all(text.startswith("retrained on all 24 training images") for text in
               members.values()), members
    served = load_bundle(source / "bundle").manifest.metrics["members"]
    assert all(text.startswith("best cross-validation fold") for text in served.values())
