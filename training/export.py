"""``spinenode train export``: a trained run -> a model bundle in the workers' format.

Members: each architecture's best fold (by validation AUROC); ensemble weights and threshold
from RUN/ensemble.json; the detector's best checkpoint. A reduced precision is listed as
validated only after it was measured here against float32 on cached images of the run's
training split (never its test set), for the members and for the detector apart: bfloat16 where
the CPU has it natively, float16 where a CUDA GPU is, and int8 members on an x86-64 CPU (each
member checked apart, on its own validation fold where it is a cross-validation fold:
``check_int8``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dicom_node import __version__
from dicom_node.files import sha256_of
from training.bundle_writer import BundleContents, ClassifierMember, save_bundle
from training.config import ConfigError, TrainingConfig
from training.dataset_index import DatasetIndex
from training.init_weights import recorded_starts
from training.provenance import git_commit, library_versions
from workers.bundle import (
    PRECISION_TOLERANCE,
    Manifest,
    ValidatedPrecisions,
    load_bundle,
    write_manifest,
)
from workers.dernet import DERNet, build_member, tta_views
from workers.detector import Detector, letterbox, load_detection_model, prediction_differences
from workers.int8 import cpu_serves_int8, observer_statistics, prepare_member
from workers.offline import prepare_offline
from workers.runtime import DTYPES, cpu_has_native_bfloat16


def _check_images(run: Path, limit: int = 32) -> list[np.ndarray]:
    """The first ``limit`` training-split images, as cached: inputs for the precision check."""
    chosen = DatasetIndex.read(run).split("train")[:limit]
    return [np.load(i.cache_file(run)).astype(np.float32) for i in chosen]


def reduced_precisions() -> dict[str, torch.device]:
    """The reduced precisions this machine can check a bundle in, each on the device the
    runtime serves it on: bfloat16 on a CPU with native bfloat16, float16 on a CUDA GPU."""
    found = {}
    if cpu_has_native_bfloat16():
        found["bfloat16"] = torch.device("cpu")
    if torch.cuda.is_available():
        found["float16"] = torch.device("cuda")
    if cpu_serves_int8():
        found["int8"] = torch.device("cpu")
    return found


INT8_CALIBRATION = "int8-calibration.pt"
# Images a pass when calibrating and checking int8: more would be fewer observer histograms to
# rebuild (one a pass), but 32 at full size would be 160 views of 384 px in one batch.
INT8_IMAGES_A_PASS = 4


def calibrate_int8(target: Path,
                   images: dict[str, list[np.ndarray]]) -> dict[str, dict[str, torch.Tensor]]:
    """Run each member's ``images[architecture]`` (their TTA views, as served) through it with
    observers on, and keep what the observers saw in the bundle, named in its manifest
    (workers/int8.py). Returns it, by architecture."""
    bundle = load_bundle(target)
    spec = bundle.manifest.classifier
    statistics = {}
    dernet = DERNet(bundle, torch.device("cpu"))
    for name, _, model in dernet.members:
        prepared = prepare_member(model, name, spec.input_size)
        with torch.inference_mode():
            for start in range(0, len(images[name]), INT8_IMAGES_A_PASS):
                batch = images[name][start:start + INT8_IMAGES_A_PASS]
                prepared(tta_views(dernet.inputs(batch), spec.tta))
        statistics[name] = observer_statistics(prepared)
    _keep_int8_calibration(target, statistics)
    return statistics


def _keep_int8_calibration(target: Path, statistics: dict[str, dict[str, torch.Tensor]]) -> None:
    """These members' calibration in the bundle; none: no file, and the manifest names none."""
    file = target / INT8_CALIBRATION
    if statistics:
        torch.save(statistics, file)
        _name_int8_calibration(target, INT8_CALIBRATION, sha256_of(file))
    else:
        _name_int8_calibration(target, None, None)
        file.unlink(missing_ok=True)


def check_int8(target: Path, calibration: dict[str, list[np.ndarray]],
               checked: dict[str, list[np.ndarray]], held_out: bool) -> dict:
    """Calibrate each member on ``calibration[architecture]``, then compare its int8 and float32
    probabilities (TTA mean) on ``checked[architecture]``. A member within the tolerance keeps
    its calibration and is served in int8; the others as float members. ``held_out``: whether the
    checked images are ones the member did not learn from."""
    statistics = calibrate_int8(target, calibration)
    bundle = load_bundle(target)
    cpu = torch.device("cpu")
    exact, reduced = DERNet(bundle, cpu), DERNet(bundle, cpu, torch.qint8)
    members = {}
    for name, images in checked.items():
        members[name] = 0.0
        for start in range(0, len(images), INT8_IMAGES_A_PASS):
            inputs = exact.inputs(images[start:start + INT8_IMAGES_A_PASS])
            full, int8 = (dernet.view_probabilities(inputs, only=name)[name].mean(dim=1)
                          for dernet in (exact, reduced))
            members[name] = max(members[name], float((full - int8).abs().max()))
    # A member that could not be compiled here is served in float32 (workers/int8.py): it
    # differs by nothing, and is not int8.
    not_compiled = sorted(set(members) - set(reduced.int8_members))
    passed = [name for name, d in members.items()
              if d <= PRECISION_TOLERANCE["probability"] and name not in not_compiled]
    _keep_int8_calibration(target, {name: statistics[name] for name in passed})
    return {"device": "cpu", "held_out": held_out,
            "images": {name: len(images) for name, images in checked.items()},
            # the classifier as served: its int8 members (float32 ones differ by nothing)
            "differences": {"probability": max((members[n] for n in passed),
                                               default=max(members.values()))},
            "members": members, "not_compiled": not_compiled, "int8_members": passed,
            "passed": {"classifier": bool(passed)}}


def _name_int8_calibration(target: Path, file: str | None, sha256: str | None) -> None:
    # Not checked against the hashes: the file it is about is the one being replaced.
    manifest = load_bundle(target, verify_checksums=False).manifest
    classifier = manifest.classifier.model_copy(
        update={"int8_calibration": file, "int8_calibration_sha256": sha256})
    write_manifest(target, manifest.model_copy(update={"classifier": classifier}))


def check_precision(bundle_path: Path, images: list[np.ndarray], dtype: torch.dtype,
                    device: torch.device = torch.device("cpu")) -> dict[str, float]:  # noqa: B008
    """Largest differences between float32 and ``dtype`` on these images, both on ``device``,
    serving code paths."""
    from workers.dernet import autocast

    bundle = load_bundle(bundle_path)
    exact = DERNet(bundle, device).classify(images)
    reduced = DERNet(bundle, device, dtype).classify(images)
    probability = max(abs(a.member_probabilities[n] - b.member_probabilities[n])
                      for a, b in zip(exact, reduced, strict=True)
                      for n in a.member_probabilities)
    size = bundle.manifest.detector.image_size
    batch = torch.stack([letterbox(image, size)[0] for image in images]).to(device)
    full = Detector(bundle, device).raw_predictions(batch)
    detector = Detector(bundle, device, dtype)
    with autocast(device, dtype):
        approximate = detector.raw_predictions(batch)
    return {"probability": float(probability), **prediction_differences(full, approximate)}


def validate_precisions(target: Path, images: list[np.ndarray],
                        int8_images: tuple[dict, dict, bool] | None = None,
                        int8: bool = True) -> dict:
    """Check the bundle in every reduced precision this machine has (reduced_precisions; int8
    only if ``int8``) and write into its manifest which passed, per component (the members on
    probabilities, the detector on raw boxes and scores), and the differences measured. The
    checks, by name. int8 (``check_int8``) uses ``int8_images`` (calibration and checked
    images per member, and whether those are held out), by default the first and second half
    of ``images``."""
    checks = {}
    validated = {"classifier": ["float32"], "detector": ["float32"]}
    for name, device in reduced_precisions().items():
        if name == "int8" and not int8:
            continue
        if name == "int8":
            checks[name] = check_int8(target, *(int8_images or _halves(target, images)))
        else:
            differences = check_precision(target, images, DTYPES[name], device)
            passed = {component: all(differences[k] <= PRECISION_TOLERANCE[k] for k in keys)
                      for component, keys in (("classifier", ["probability"]),
                                              ("detector", ["box_px", "score"]))}
            checks[name] = {"device": device.type, "images": len(images),
                            "differences": differences, "passed": passed}
        for component, ok in checks[name]["passed"].items():
            validated[component] += [name] if ok else []
    if checks:
        manifest: Manifest = load_bundle(target).manifest
        write_manifest(target, manifest.model_copy(update={
            "validated_precisions": ValidatedPrecisions(**validated),
            "metrics": {**manifest.metrics, "precision_check": {
                "tolerance": PRECISION_TOLERANCE, **checks}},
        }))
    return checks


def _halves(target: Path, images: list[np.ndarray]) -> tuple[dict, dict, bool]:
    half = max(1, len(images) // 2)
    members = [m.architecture for m in load_bundle(target).manifest.classifier.members]
    return ({name: images[:half] for name in members},
            {name: images[half:] or images for name in members}, False)


def _int8_images(run: Path, config: TrainingConfig, ensemble: dict,
                 limit: int = 32) -> tuple[dict, dict, bool] | None:
    """Per member, training images to calibrate on and others to check on: where the member
    is a cross-validation fold, its own validation fold (images it did not learn from) to check
    on, the other folds to calibrate on. None for retrained members (``_halves``)."""
    if config.classify.final_members == "retrain":
        return None
    train = DatasetIndex.read(run).split("train")

    def load(items: list) -> list[np.ndarray]:
        return [np.load(i.cache_file(run)).astype(np.float32) for i in items[:limit]]

    folds = ensemble["best_folds"]
    return ({name: load([i for i in train if i.fold != fold]) for name, fold in folds.items()},
            {name: load([i for i in train if i.fold == fold]) for name, fold in folds.items()},
            True)


def _which_members(run: Path, config: TrainingConfig, ensemble: dict) -> dict[str, str]:
    """Member -> what the bundle serves of it, in words (the report says it too)."""
    if config.classify.final_members == "retrain":
        return {name: (f"retrained on all {final['images']} training images for "
                       f"{final['epochs']} epochs (median of the folds' best "
                       f"{final['fold_best_epochs']})")
                for name in ensemble["weights"]
                for final in [json.loads((run / "classify" / name / "final.json").read_text())]}
    return {name: f"best cross-validation fold ({ensemble['best_folds'][name]})"
            for name in ensemble["weights"]}


def export_bundle(run: Path, config: TrainingConfig, target: Path, name: str,
                  version: str) -> Path:
    ensemble = json.loads((run / "ensemble.json").read_text())
    dataset = DatasetIndex.read(run)
    members = []
    retrained = config.classify.final_members == "retrain"
    for architecture, weight in ensemble["weights"].items():
        model = build_member(architecture)
        folder = run / "classify" / architecture
        if retrained and not (folder / "final.pt").exists():
            raise ConfigError(f"{folder / 'final.pt'} missing: classify.final_members is "
                              f"retrain, so run 'spinenode train final' before export")
        weights = (folder / "final.pt" if retrained
                   else folder / f"fold{ensemble['best_folds'][architecture]}.pt")
        model.load_state_dict(torch.load(weights, weights_only=True))
        members.append(ClassifierMember(architecture, model, weight))
    prepare_offline(run / "ultralytics")
    detector = load_detection_model(str(run / "detect" / "train" / "weights" / "best.pt"))
    metrics = {"classification_oof_auroc": ensemble["oof_auroc"],
               "member_oof_auroc": ensemble["member_oof_auroc"],
               "members": _which_members(run, config, ensemble)}
    evaluation = run / "evaluation.json"
    if evaluation.exists():
        metrics["test"] = json.loads(evaluation.read_text())
    save_bundle(target, BundleContents(
        name=name, version=version, members=members, threshold=ensemble["threshold"],
        detector=detector, detector_scale=config.detect.scale,
        input_size=config.classify.input_size, source_size=config.data.cache_size,
        image_size=config.detect.image_size,
        clinical_use=False,  # only a validated, approved process may say otherwise
        provenance={"data_fingerprint": dataset.fingerprint, "data_source": dataset.source,
                    "config": config.model_dump(mode="json"), "spinenode": __version__,
                    "git_commit": git_commit(), "libraries": library_versions(),
                    "init_weights": recorded_starts(run, config.classify.members)},
        metrics=metrics,
    ))
    validate_precisions(target, _check_images(run), _int8_images(run, config, ensemble),
                        int8=config.classify.int8)
    load_bundle(target)
    return target
