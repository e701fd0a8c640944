"""int8 DERNet members (workers/int8.py): export calibrates them on half its check images and
checks them on the other half against float32; a worker serves them only where that passed, from
the calibration the bundle carries (hashed like the weights), and never the detector in int8."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import training.export
import workers.runtime
from dicom_node.files import sha256_of
from tests.support.bundles import make_test_bundle
from training.config import load_config
from training.export import (
    INT8_CALIBRATION,
    PRECISION_TOLERANCE,
    calibrate_int8,
    validate_precisions,
)
from training.synthetic import radiograph_pixels
from workers.bundle import (
    TTA_NAMES,
    BundleError,
    ValidatedPrecisions,
    load_bundle,
    write_manifest,
)
from workers.compiled import FixedBatch
from workers.dernet import DERNet, build_member, tta_views
from workers.int8 import (
    calibrated_member,
    convert_member,
    cpu_serves_int8,
    observer_statistics,
    prepare_member,
    x86_quantizer,
)
from workers.runtime import ModelRuntime, select_precision

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not cpu_serves_int8(), reason="no x86-64 int8 engine here")
CPU = torch.device("cpu")


# The member export checks compiled here; the worker test adds DenseNet-121 beside it, served in
# a float precision. Compiling is most of this file's time: DenseNet-121's int8 graph took 98 s
# to compile on a 2-core AMD EPYC (Zen 3), ResNet-50's 15 s, and EfficientNetV2-S's
# random-weight int8 graph is chaotic (its probabilities 0.9999 off float32). The other two
# architectures' graphs are calibrated and converted below, uncompiled; compiling all three is
# benchmarks/int8_members.py's.
INT8_BUNDLE_MEMBERS = (("resnet50", 1.0),)


def _images(seeds: range) -> list[np.ndarray]:
    return [radiograph_pixels(300, 240, 12, seed).astype(np.float32) / 4095 for seed in seeds]


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    # At 96 px: the session's 64-px random-weight bundle has a member so far off any trained
    # one that even bfloat16 misses the tolerance there.
    path = make_test_bundle(tmp_path_factory.mktemp("int8") / "bundle", input_size=96,
                            image_size=96, members=INT8_BUNDLE_MEMBERS)
    return path, validate_precisions(path, _images(range(4)))


def test_export_calibrates_checks_and_records_int8(int8_bundle: tuple[Path, dict]) -> None:
    path, checks = int8_bundle
    check = checks["int8"]
    manifest = load_bundle(path).manifest
    members = {m.architecture for m in manifest.classifier.members}
    # Without a run's folds: calibrated on two of the four images, checked on the other two,
    # each member apart; the members only, no detector.
    assert check["device"] == "cpu" and check["held_out"] is False
    assert check["images"] == dict.fromkeys(members, 2) and set(check["members"]) == members
    # int8: each member within the tolerance whose int8 graph compiled here and, compiled,
    # stayed within it of float32 on the runtime's example too (workers/int8.py); one that did
    # not is served in float32.
    assert set(check["int8_members"]) == {
        name for name, d in check["members"].items()
        if d <= PRECISION_TOLERANCE["probability"]} - set(check["not_compiled"])
    assert not set(check["not_compiled"]) - members
    assert check["passed"] == {"classifier": bool(check["int8_members"])}
    assert check["differences"]["probability"] == max(check["members"][n]
                                                      for n in check["int8_members"])
    assert manifest.metrics["precision_check"]["int8"] == check
    assert "int8" in manifest.validated_precisions.classifier
    assert "int8" not in manifest.validated_precisions.detector
    assert manifest.classifier.int8_calibration == INT8_CALIBRATION
    assert manifest.classifier.int8_calibration_sha256 == sha256_of(path / INT8_CALIBRATION)
    # What the bundle keeps is the observers' statistics of the members that passed, no weights.
    statistics = torch.load(path / INT8_CALIBRATION, weights_only=True)
    assert set(statistics) == set(check["int8_members"])
    assert all("activation_post_process" in key for s in statistics.values() for key in s)


def test_the_worker_serves_the_checked_int8_members_and_the_rest_in_the_best_float(
        int8_bundle: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One member calibrated in int8 (export checked it: the fixture), the other without a
    # calibration (as if its check had failed) in bfloat16, which the bundle validated, as on
    # a CPU that has it natively; not in float32.
    assert int8_bundle[1]["int8"]["passed"]["classifier"], int8_bundle[1]
    int8_member = "resnet50"
    # The same seed builds the same ResNet-50 first, then DenseNet-121 beside it.
    path = make_test_bundle(tmp_path / "bundle", input_size=96, image_size=96,
                            members=(*INT8_BUNDLE_MEMBERS, ("densenet121", 0.4)))
    checked = load_bundle(int8_bundle[0]).manifest.classifier.members
    manifest = load_bundle(path).manifest
    assert [m.sha256 for m in manifest.classifier.members if m.architecture == int8_member] == \
        [m.sha256 for m in checked if m.architecture == int8_member]
    statistics = torch.load(int8_bundle[0] / INT8_CALIBRATION, weights_only=True)
    training.export._keep_int8_calibration(path, {int8_member: statistics[int8_member]})
    manifest = load_bundle(path).manifest
    write_manifest(path, manifest.model_copy(update={"validated_precisions": ValidatedPrecisions(
        classifier=["float32", "bfloat16", "int8"], detector=["float32"])}))
    monkeypatch.setattr(workers.runtime, "cpu_has_native_bfloat16", lambda: True)
    bundle = load_bundle(path)
    # int8 comes before native bfloat16 where the bundle passed both (workers/runtime.py).
    runtime = ModelRuntime(bundle, CPU, 0, None)
    members = [m.architecture for m in bundle.manifest.classifier.members]
    assert runtime.classifier.member_dtypes == {
        name: torch.qint8 if name == int8_member else torch.bfloat16 for name in members}
    assert runtime.precision == "int8+bfloat16/float32"  # what an analysis records
    assert runtime.classifier.int8_members == [int8_member]
    assert runtime.detector.dtype != torch.qint8
    for name, _, model in runtime.classifier.members:  # a compiled int8 graph where checked only
        operations = ({str(node.target) for node in model.eager.graph.nodes}
                      if isinstance(model, FixedBatch) else set())
        assert ("quantized_decomposed.quantize_per_tensor.default" in operations) == (
            name == int8_member)
    computed_in = {}  # what the float members' first convolution put out

    def record(name: str):  # noqa: ANN202
        def hook(_module: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            computed_in[name] = out.dtype
        return hook
    for name, _, model in runtime.classifier.members:
        if name != int8_member:
            first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            first.register_forward_hook(record(name))
    held_out = _images(range(10, 13))  # neither calibrated nor checked on
    inputs = DERNet(bundle, CPU).inputs(held_out)
    served = runtime.classifier.view_probabilities(inputs)
    assert computed_in == dict.fromkeys(set(members) - {int8_member}, torch.bfloat16)
    in_bfloat16 = DERNet(bundle, CPU, torch.bfloat16).view_probabilities(inputs)
    for name in computed_in:
        assert torch.equal(served[name], in_bfloat16[name])
    exact = ModelRuntime(bundle, CPU, 0, None, "float32")
    for a, b in zip(exact.analyse(held_out), runtime.analyse(held_out), strict=True):
        assert abs(a.classification.member_probabilities[int8_member]
                   - b.classification.member_probabilities[int8_member]) <= \
            PRECISION_TOLERANCE["probability"]
        assert len(a.findings) == len(b.findings)  # the detector is not int8


def test_converting_leaves_out_only_a_step_that_changes_nothing() -> None:
    # convert_member skips torchao's fold of quantization-aware-training patterns (slow where a
    # graph keeps a BatchNorm, as DenseNet-121's before each convolution): on such a graph,
    # calibrated for post-training quantization as members are, it gives torchao's own result.
    import copy

    from torchao.quantization.pt2e import quantize_pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class DenseLayer(torch.nn.Module):
        """BatchNorm-ReLU-convolution (the BatchNorm stays), convolution-BatchNorm (folded), and
        DenseNet's concatenation (a dequantization with two users, which the fold splits)."""

        def __init__(self) -> None:
            super().__init__()
            self.norm, self.conv = torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv_bn = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(torch.relu(self.norm(x)))
            return torch.cat([y, self.conv_bn(y)], dim=1)

    assert hasattr(quantize_pt2e, "_fold_conv_bn_qat")  # else the step is no longer left out
    torch.manual_seed(0)
    dense_layer = DenseLayer().eval()
    inputs = torch.rand(2, 3, 16, 16)
    prepared = prepare_pt2e(torch.export.export(dense_layer, (inputs,)).module(),
                            x86_quantizer())
    prepared(inputs)
    assert any("batch_norm" in str(node.target) for node in prepared.graph.nodes)
    ours, torchaos = convert_member(copy.deepcopy(prepared)), convert_pt2e(prepared)
    assert ours.code == torchaos.code
    assert torch.equal(ours(inputs), torchaos(inputs))


@pytest.mark.parametrize("architecture", ["densenet121", "tf_efficientnetv2_s"])
def test_the_members_left_out_of_the_bundle_take_the_int8_quantizer(architecture: str) -> None:
    # The architectures the int8 bundle leaves out: calibrated on one image's views as export
    # calibrates, their statistics loaded into a graph of their own and converted as a worker
    # does (quantized_member, less compiling); the quantized graph runs, emulated.
    torch.manual_seed(0)
    model = build_member(architecture).eval()
    calibrated = prepare_member(model, architecture, 64)
    views = tta_views(torch.rand(1, 3, 64, 64), list(TTA_NAMES))
    with torch.inference_mode():
        calibrated(views)
    statistics = observer_statistics(calibrated)
    assert statistics
    converted = calibrated_member(model, architecture, 64, statistics)
    operations = {str(node.target) for node in converted.graph.nodes}
    assert "quantized_decomposed.quantize_per_tensor.default" in operations
    with torch.inference_mode():
        assert torch.isfinite(converted(views)).all()


NO_COMPILER = """
from tests.support import no_network
no_network.block()  # before torchao is imported: nothing of int8 reaches outside
import sys, torch
from workers.bundle import load_bundle
from workers.compiled import FixedBatch
from workers.dernet import DERNet
from workers.int8 import cpu_serves_int8
from workers.runtime import select_precision

bundle, cpu = load_bundle(sys.argv[1]), torch.device("cpu")
assert "int8" in bundle.manifest.validated_precisions.classifier
assert not cpu_serves_int8()
assert select_precision("auto", cpu, bundle, "classifier") != torch.qint8
try:
    select_precision("int8", cpu, bundle, "classifier")
    raise AssertionError("int8 taken without a compiler")
except ValueError as error:
    assert "C++ compiler" in str(error), error
dernet, exact = DERNet(bundle, cpu, torch.qint8), DERNet(bundle, cpu)
assert dernet.int8_members == []
assert not any(isinstance(model, FixedBatch) for _, _, model in dernet.members)
inputs = torch.rand(1, 3, 96, 96)
assert torch.equal(dernet.view_probabilities(inputs)["resnet50"],
                   exact.view_probabilities(inputs)["resnet50"])
print("served in float32")
"""


def test_without_a_compiler_int8_members_are_served_in_float32(tmp_path: Path) -> None:
    # int8 is fast only compiled (workers/int8.py): on a machine without a C++ compiler (a
    # worker process whose PATH has none) "auto" does not take it, and int8 asked for all the
    # same serves each member in float32. Its own process: inductor's compiling processes
    # would keep the PATH without a compiler.
    path = make_test_bundle(tmp_path / "bundle", input_size=96, members=(("resnet50", 1.0),))
    calibrate_int8(path, {"resnet50": _images(range(2))})
    write_manifest(path, load_bundle(path).manifest.model_copy(update={
        "validated_precisions": ValidatedPrecisions(classifier=["float32", "int8"],
                                                    detector=["float32"])}))
    result = subprocess.run([sys.executable, "-c", NO_COMPILER, str(path)], cwd=ROOT,
                            env={"PATH": "/nonexistent", "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served in float32" in result.stdout
    assert "resnet50 (int8): not compiled" in result.stderr
    assert "blocked" not in result.stderr


def test_a_changed_calibration_is_refused(int8_bundle: tuple[Path, dict],
                                          tmp_path: Path) -> None:
    path = tmp_path / "bundle"
    shutil.copytree(int8_bundle[0], path)
    data = bytearray((path / INT8_CALIBRATION).read_bytes())
    data[-100] ^= 1
    (path / INT8_CALIBRATION).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        ModelRuntime(load_bundle(path), CPU, 0, None)


def test_int8_only_where_checked(test_bundle: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_bundle(test_bundle)  # float32 only, no calibration
    with pytest.raises(ValueError, match="not validated"):
        select_precision("int8", CPU, bundle, "classifier")
    assert select_precision("auto", CPU, bundle, "classifier") != torch.qint8
    with pytest.raises(BundleError, match="no int8 calibration"):
        DERNet(bundle, CPU, torch.qint8)
    # A check that fails (a tolerance nothing meets) leaves neither the claim nor the file.
    path = make_test_bundle(tmp_path / "bundle", input_size=96, members=(("resnet50", 1.0),))
    monkeypatch.setitem(training.export.PRECISION_TOLERANCE, "probability", -1.0)
    monkeypatch.setattr(training.export, "reduced_precisions", lambda: {"int8": CPU})
    checks = validate_precisions(path, _images(range(2)))
    assert checks["int8"]["passed"] == {"classifier": False}
    assert checks["int8"]["int8_members"] == []
    manifest = load_bundle(path).manifest
    assert "int8" not in manifest.validated_precisions.classifier
    assert manifest.classifier.int8_calibration is None
    assert not (path / INT8_CALIBRATION).exists()
    assert ModelRuntime(load_bundle(path), CPU, 0, None).classifier.dtype != torch.qint8


def test_a_recipe_without_int8_is_not_calibrated(test_bundle: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo's recipe (classify.int8: false): no calibration, no claim, float32 served.
    path = tmp_path / "bundle"
    shutil.copytree(test_bundle, path)
    monkeypatch.setattr(training.export, "reduced_precisions", lambda: {"int8": CPU})
    assert validate_precisions(path, _images(range(2)), int8=False) == {}
    manifest = load_bundle(path).manifest
    assert manifest.validated_precisions.classifier == ["float32"]
    assert manifest.classifier.int8_calibration is None
    assert not (path / INT8_CALIBRATION).exists()
    assert load_config("demo").classify.int8 is False
