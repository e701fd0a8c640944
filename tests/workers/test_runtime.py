"""DERNet + YOLO11 runtime and the worker's analysis step, on the random-weight test bundle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.config import load_settings
from dicom_node.db import migrate
from dicom_node.db.models import Analysis, Finding, Instance
from dicom_node.db.session import session_factory
from dicom_node.intake import Intake
from tests.support.node import instances, storescu, wait_for, wait_until_settled
from training.synthetic import make_radiograph
from workers.bundle import load_bundle
from workers.dernet import DERNet, build_member, cached_view, classifier_input
from workers.detector import Letterbox, _yolo11, class_branch_width, letterbox
from workers.offline import prepare_offline, ultralytics_modules
from workers.pipeline import Pipeline
from workers.runtime import ModelRuntime, runtime_for


def test_ensemble_is_the_weighted_mean_of_members_over_the_listed_tta(test_bundle: Path) -> None:
    bundle = load_bundle(test_bundle)
    model = DERNet(bundle, torch.device("cpu"))
    image = np.random.default_rng(0).random((300, 200), dtype=np.float32)
    (result,) = model.classify([image])

    # Recompute independently: each member built and loaded here, each view made by hand.
    spec = bundle.manifest.classifier
    x = classifier_input(image, spec)[None]
    expected_members = {}
    for member in spec.members:
        net = build_member(member.architecture)
        net.load_state_dict(torch.load(bundle.file(member.weights), weights_only=True))
        net.eval()
        with torch.no_grad():
            identity = torch.sigmoid(net(x)).item()
            flipped = torch.sigmoid(net(x.flip(-1))).item()
        expected_members[member.architecture] = (identity, flipped)
    # The first two listed views are identity and hflip; check them alone through the runtime.
    two = bundle.model_copy(update={"manifest": bundle.manifest.model_copy(update={
        "classifier": spec.model_copy(update={"tta": ["identity", "hflip"]})})})
    (two_views,) = DERNet(two, torch.device("cpu")).classify([image])
    for name, (identity, flipped) in expected_members.items():
        assert two_views.member_probabilities[name] == pytest.approx((identity + flipped) / 2,
                                                                     abs=1e-5)
    weights = {m.architecture: m.ensemble_weight for m in spec.members}
    recomputed = sum(weights[n] * p for n, p in result.member_probabilities.items()) / sum(
        weights.values())
    assert result.probability == pytest.approx(recomputed, abs=1e-7)
    assert result.abnormal == (result.probability >= spec.threshold)
    assert set(result.member_probabilities) == set(weights)


@pytest.mark.parametrize("shape", [(1955, 1841), (800, 2400), (640, 640), (333, 517)])
def test_boxes_map_back_through_the_letterbox_exactly(shape: tuple[int, int]) -> None:
    height, width = shape
    image = np.zeros(shape, dtype=np.float32)
    box = np.array([[width * 0.25, height * 0.4, width * 0.5, height * 0.7]])
    x0, y0, x1, y1 = box[0].round().astype(int)
    image[y0:y1, x0:x1] = 1.0
    canvas, geometry = letterbox(image, 640)
    assert canvas.shape == (3, 640, 640)
    # The round trip is the identity (up to float rounding).
    np.testing.assert_allclose(geometry.to_original(geometry.to_input(box)), box, atol=1e-9)
    # And the bright rectangle really sits where to_input says (within the resampling blur).
    rows = np.nonzero(canvas[0].numpy().max(axis=1) > 0.5)[0]
    cols = np.nonzero(canvas[0].numpy().max(axis=0) > 0.5)[0]
    found = np.array([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], dtype=float)
    np.testing.assert_allclose(geometry.to_original(found), [[x0, y0, x1, y1]],
                               atol=1.5 / min(geometry.scale_x, geometry.scale_y) + 1)


def test_known_letterbox_numbers() -> None:
    _, geometry = letterbox(np.zeros((1000, 500), dtype=np.float32), 640)
    assert geometry == Letterbox(scale_x=320 / 500, scale_y=640 / 1000, pad_x=160, pad_y=0,
                                 width=500, height=1000)
    boxes = geometry.to_original(np.array([[160.0, 0.0, 480.0, 640.0], [0, 0, 10, 10]]))
    np.testing.assert_allclose(boxes, [[0, 0, 500, 1000], [0, 0, 0, 15.625]])  # clipped


@pytest.mark.parametrize("source_size", [None, 256])
def test_a_tensor_is_preprocessed_as_its_array_is(test_bundle: Path,
                                                  source_size: int | None) -> None:
    """A GPU worker hands the models its images as tensors on the GPU (ModelRuntime.analyse)
    and they are resized there; on the CPU the same functions must give what an array gives,
    bit for bit, through the training cache's float16 view too (tests/workers/test_cuda.py
    compares the GPU's)."""
    spec = load_bundle(test_bundle).manifest.classifier.model_copy(
        update={"source_size": source_size})
    image = np.random.default_rng(3).random((700, 520), dtype=np.float32)
    tensor = torch.from_numpy(image.copy())
    from_array, from_tensor = classifier_input(image, spec), classifier_input(tensor, spec)
    assert from_tensor.dtype == from_array.dtype == torch.float32
    assert torch.equal(from_tensor, from_array)
    if source_size is not None:
        # The cache's view as training stores it (training/prepare.py): a float16 array, the
        # image resized in float32 and rounded once; a tensor's the same values.
        view = cached_view(image, source_size)
        resized = F.interpolate(torch.from_numpy(image)[None, None], size=(256, 190),
                                mode="bilinear", antialias=True, align_corners=False)[0, 0]
        assert isinstance(view, np.ndarray) and view.dtype == np.float16
        np.testing.assert_array_equal(view, resized.numpy().astype(np.float16))
        tensor_view = cached_view(tensor, source_size)
        assert tensor_view.dtype == torch.float16
        np.testing.assert_array_equal(tensor_view.numpy(), view)
    (canvas, geometry), (tensor_canvas, tensor_geometry) = (letterbox(image, 160),
                                                            letterbox(tensor, 160))
    assert torch.equal(tensor_canvas, canvas) and tensor_geometry == geometry


def _stored_instance(tmp_path: Path, settings) -> int:
    path = make_radiograph(tmp_path / "in" / "a.dcm", rows=300, columns=240)
    incoming = settings.incoming_dir / "a.dcm"
    shutil.copy(path, incoming)
    ds = dcmread(path, stop_before_pixels=True)
    outcome = Intake(settings, session_factory(settings.effective_database_url)).store(
        incoming, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
        calling_ae="TEST", called_ae="SPINENODE")
    assert outcome.instance_id is not None
    return outcome.instance_id


def test_a_detector_trained_from_a_wider_start_is_built_as_training_built_it(
        tmp_path: Path) -> None:
    """A detector trained from weights for more classes (COCO's 80) keeps the start's class
    branch width: the layout built for its bundle is the 80-class model's head with the last
    layer of each class branch for our classes, BatchNorms initialised as a model's build does
    (a head built alone would keep torch's own eps)."""
    prepare_offline(tmp_path / "ultralytics")
    build = ultralytics_modules().DetectionModel
    coco, expected = (build("yolo11n.yaml", nc=nc, verbose=False) for nc in (80, 5))
    width, narrow = class_branch_width(coco), class_branch_width(expected)
    expected.model[-1].cv3 = coco.model[-1].cv3
    for branch in expected.model[-1].cv3:
        branch[-1] = torch.nn.Conv2d(width, 5, 1)
    built = _yolo11("n", 5, width)
    assert class_branch_width(built) == width > narrow
    assert str(built) == str(expected)
    assert {k: v.shape for k, v in built.state_dict().items()} == \
        {k: v.shape for k, v in expected.state_dict().items()}


def test_redelivered_task_leaves_one_analysis_and_models_load_once(
        tmp_path: Path, test_bundle: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "var", bundle=test_bundle, torch_threads=2)
    settings.make_dirs()
    migrate.upgrade(settings.effective_database_url)
    sessions = session_factory(settings.effective_database_url)
    instance_id = _stored_instance(tmp_path, settings)
    loads = ModelRuntime.loads
    queued_deliveries: list[int] = []
    pipeline = Pipeline(settings, sessions, queued_deliveries.append)
    assert pipeline.process(instance_id).status == "done"
    assert pipeline.process(instance_id).status == "skipped"
    # Even a task that finds the instance claimable again (a crash after the commit) adds none.
    with sessions.begin() as session:
        session.get(Instance, instance_id).status = "queued"
    assert pipeline.process(instance_id).status == "done"
    assert queued_deliveries == []  # no destination configured: nothing to send
    assert ModelRuntime.loads - loads <= 1  # at most the first call built the runtime
    assert runtime_for(settings) is runtime_for(settings)
    assert torch.get_num_threads() == 2
    with sessions() as session:
        analyses = session.scalars(select(Analysis)).all()
        assert len(analyses) == 1
        analysis = analyses[0]
        assert analysis.bundle_name == "spinenode-test" and analysis.clinical_use is False
        assert set(analysis.member_probabilities) == {"densenet121", "tf_efficientnetv2_s",
                                                      "resnet50"}
        assert analysis.label in ("normal", "abnormal") and analysis.device == "cpu float32"
        findings = session.scalars(select(Finding)).all()
        assert len(findings) == session.scalar(select(func.count(Finding.id)))
        for finding in findings:  # boxes are in the source image's pixels
            assert 0 <= finding.x0 <= finding.x1 <= 240 and 0 <= finding.y0 <= finding.y1 <= 300
            assert finding.score >= 0.25


def test_without_a_bundle_instances_wait_then_are_analysed(tmp_path: Path, sqlite_url: str,
                                                           test_bundle: Path,
                                                           start_node) -> None:
    node = start_node(sqlite_url)
    files = [make_radiograph(tmp_path / f"{i}.dcm", seed=i) for i in range(2)]
    assert storescu(node.port, files).returncode == 0
    rows = wait_until_settled(sqlite_url, 2)
    assert [r.status for r in rows] == ["waiting-for-model"] * 2
    assert all(r.rows == 256 for r in rows)  # decoded all the same
    node.stop()

    start_node(sqlite_url, env={"SPINENODE_BUNDLE": str(test_bundle)})
    wait_for(lambda: all(r.status == "done" for r in instances(sqlite_url)), 120,
             what="the reconciler to analyse the waiting instances")
    with session_factory(sqlite_url)() as session:
        assert session.scalar(select(func.count(Analysis.id))) == 2


def test_runtime_works_with_the_network_blocked(tmp_path: Path, test_bundle: Path) -> None:
    # A fresh process, blocked before anything imports ultralytics.
    script = textwrap.dedent(f"""
        from tests.support import no_network
        no_network.block()
        import numpy as np, torch
        from pathlib import Path
        from dicom_node.config import load_settings
        from workers.runtime import runtime_for
        settings = load_settings(data_dir=Path({str(tmp_path)!r}),
                                 bundle=Path({str(test_bundle)!r}), torch_threads=2)
        runtime = runtime_for(settings)
        (result,) = runtime.analyse([np.random.default_rng(1).random((500, 400), dtype=np.float32)])
        assert 0 <= result.classification.probability <= 1
        assert torch.get_num_threads() == 2, torch.get_num_threads()
        print("analysed offline", len(result.findings), "boxes")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=env, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "analysed offline" in result.stdout
    assert "blocked" not in result.stderr + result.stdout
    assert (tmp_path / "ultralytics" / "Arial.ttf").is_file()


def test_network_is_blocked_in_tests() -> None:
    import socket

    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    with pytest.raises(OSError, match="blocked"):
        socket.getaddrinfo("github.com", 443)


def test_vindr_rule_keeps_only_confident_boxes_on_normal_images(test_bundle: Path) -> None:
    bundle = load_bundle(test_bundle)
    # Confidence 0: the random detector then returns boxes of every score for the rule to sort.
    manifest = bundle.manifest
    bundle = bundle.model_copy(update={"manifest": manifest.model_copy(update={
        "detector": manifest.detector.model_copy(update={"confidence": 0.0})})})
    image = np.random.default_rng(2).random((256, 200), dtype=np.float32)
    all_boxes = ModelRuntime(bundle, torch.device("cpu"), 0, None).analyse([image])[0]
    assert all_boxes.findings, "the random detector finds something to filter"
    scores = [box.score for box in all_boxes.findings]
    assert min(scores) < max(scores)
    cutoff = max(scores)
    filtered = ModelRuntime(bundle, torch.device("cpu"), 0, cutoff).analyse([image])[0]
    if filtered.classification.abnormal:  # the rule leaves abnormal images alone
        assert len(filtered.findings) == len(all_boxes.findings)
    else:
        assert filtered.findings == [b for b in all_boxes.findings if b.score >= cutoff]
        assert len(filtered.findings) < len(all_boxes.findings)


@pytest.mark.parametrize("text,expected", [("auto", None), ("cpu", "cpu"), ("CPU", "cpu"),
                                           ("7", "error"), ("cuda:7", "error"),
                                           ("gpu", "error"), ("cuda:x", "error")])
def test_one_device_parser_for_serving_and_training(text: str, expected: str | None) -> None:
    from training.config import ConfigError, torch_device
    from workers.runtime import select_device

    if expected == "error":  # no GPU 7 here (nor on a one-GPU lent machine); bad spellings
        with pytest.raises(ValueError, match="device"):
            select_device(text)
        with pytest.raises(ConfigError, match="device"):
            torch_device(text)
        return
    device = select_device(text)
    assert device == torch_device(text)
    if expected is not None:
        assert device.type == expected
