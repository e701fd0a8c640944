"""Reduced precision: used only where the bundle validated it, and within the stated tolerance
of float32 (|probability difference| <= 0.01, raw box coordinates within 0.5 px, scores within
0.01), here on the random-weight test bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.bundles import make_test_bundle
from workers.bundle import BundleError, load_bundle
from workers.dernet import DERNet, autocast
from workers.detector import Detector, letterbox
from workers.runtime import cpu_has_native_bfloat16, select_precision

PROBABILITY_TOLERANCE = 0.01
BOX_TOLERANCE_PX = 0.5
SCORE_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def bf16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_bundle(tmp_path_factory.mktemp("bf16") / "bundle", input_size=96,
                            image_size=96, validated_precisions=("float32", "bfloat16"))


def test_precision_needs_validation(test_bundle: Path, bf16_bundle: Path) -> None:
    cpu = torch.device("cpu")
    float32_only = load_bundle(test_bundle)
    for component in ("classifier", "detector"):
        assert select_precision("auto", cpu, float32_only, component) == torch.float32
        with pytest.raises(ValueError, match="not validated"):
            select_precision("bfloat16", cpu, float32_only, component)
    validated = load_bundle(bf16_bundle)
    expected = torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    for component in ("classifier", "detector"):
        assert select_precision("auto", cpu, validated, component) == expected
        assert select_precision("float32", cpu, validated, component) == torch.float32
        with pytest.raises(ValueError, match="not validated|needs a CUDA"):
            select_precision("float16", cpu, validated, component)


@pytest.mark.parametrize("amx", [False, True])
def test_int8_before_bfloat16_but_compiled_bfloat16_where_the_cpu_has_amx(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amx: bool) -> None:
    """Which precision auto picks for a classifier validated in both, on each kind of CPU
    (benchmarks/int8_members.py measured the order): the CPU's flags are set, g++ is real."""
    import workers.runtime

    if not workers.runtime.cpu_serves_int8():
        pytest.skip("int8 needs an x86-64 CPU and g++")
    monkeypatch.setattr(workers.runtime, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setattr(workers.runtime, "cpu_has_amx", lambda: amx)
    path = make_test_bundle(tmp_path / "bundle", validated_precisions={
        "classifier": ["float32", "bfloat16", "int8"], "detector": ["float32", "bfloat16"]})
    bundle, cpu = load_bundle(path), torch.device("cpu")
    assert select_precision("auto", cpu, bundle, "classifier") == torch.qint8
    assert select_precision("auto", cpu, bundle, "classifier", compiled=True) == (
        torch.bfloat16 if amx else torch.qint8)
    assert select_precision("int8", cpu, bundle, "classifier", compiled=True) == torch.qint8
    for compiled in (False, True):  # the detector has no int8
        assert select_precision("auto", cpu, bundle, "detector", compiled) == torch.bfloat16
    if amx:  # the runtime asks with compile_models: bfloat16 members, then compiled
        from workers.dernet import DERNet
        from workers.detector import Detector
        from workers.runtime import ModelRuntime

        compiled_parts = []  # compiling itself is tested in test_compiled.py, and slow
        monkeypatch.setattr(DERNet, "compile", lambda self: compiled_parts.append("classifier"))
        monkeypatch.setattr(Detector, "compile", lambda self: compiled_parts.append("detector"))
        runtime = ModelRuntime(bundle, cpu, 0, None, compile_models=True)
        assert runtime.precision == "bfloat16" and compiled_parts == ["classifier", "detector"]
        with pytest.raises(BundleError, match="no int8 calibration"):  # int8 without compiling
            ModelRuntime(bundle, cpu, 0, None)


def test_each_component_gets_only_its_own_validated_precision(tmp_path: Path) -> None:
    from workers.runtime import ModelRuntime

    path = make_test_bundle(tmp_path / "bundle", validated_precisions={
        "classifier": ["float32", "bfloat16"], "detector": ["float32"]})
    runtime = ModelRuntime(load_bundle(path), torch.device("cpu"), 0, None)
    expected = torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    assert runtime.classifier.dtype == expected and runtime.detector.dtype == torch.float32
    assert runtime.precision == ("bfloat16/float32" if cpu_has_native_bfloat16() else "float32")
    with pytest.raises(ValueError, match="not validated for the detector"):
        ModelRuntime(load_bundle(path), torch.device("cpu"), 0, None, "bfloat16")


def test_bfloat16_within_tolerance_of_float32(bf16_bundle: Path) -> None:
    bundle = load_bundle(bf16_bundle)
    cpu = torch.device("cpu")
    rng = np.random.default_rng(0)
    images = [rng.random((300, 240), dtype=np.float32) for _ in range(3)]
    full = DERNet(bundle, cpu).classify(images)
    reduced = DERNet(bundle, cpu, torch.bfloat16).classify(images)
    for a, b in zip(full, reduced, strict=True):
        for name, probability in a.member_probabilities.items():
            assert abs(probability - b.member_probabilities[name]) <= PROBABILITY_TOLERANCE
        assert abs(a.probability - b.probability) <= PROBABILITY_TOLERANCE
    batch = torch.stack([letterbox(image, 96)[0] for image in images])
    exact = Detector(bundle, cpu).raw_predictions(batch)
    detector = Detector(bundle, cpu, torch.bfloat16)
    with autocast(cpu, torch.bfloat16):
        approximate = detector.raw_predictions(batch)
    assert (exact[:, :4] - approximate[:, :4]).abs().max() <= BOX_TOLERANCE_PX
    assert (exact[:, 4:] - approximate[:, 4:]).abs().max() <= SCORE_TOLERANCE
