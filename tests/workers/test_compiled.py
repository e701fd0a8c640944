"""Models compiled by inductor at load (compile_models): the same results as eager, and eager
wherever compiling fails or the compiled model disagrees (with itself eager, or the reference
it is checked against)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

from dicom_node.config import load_settings
from tests.support.bundles import make_test_bundle
from workers.bundle import PRECISION_TOLERANCE
from workers.compiled import FixedBatch, compiled_or_eager
from workers.dernet import probabilities_agree
from workers.runtime import ModelRuntime, runtime_for


@pytest.fixture(scope="module")
def one_member_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One member keeps the compiling to about half a minute; each architecture compiles alike.
    return make_test_bundle(tmp_path_factory.mktemp("compiled") / "bundle",
                            members=(("resnet50", 1.0),), detector="quadrants")


def test_compiled_models_give_the_eager_results(tmp_path: Path,
                                                one_member_bundle: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "var", bundle=one_member_bundle,
                             compile_models=True, precision="float32", torch_threads=2)
    compiled = runtime_for(settings)
    assert all(isinstance(model, FixedBatch) for _, _, model in compiled.classifier.members)
    assert isinstance(compiled.detector.model, FixedBatch)
    assert any((tmp_path / "var" / "inductor").iterdir()), "inductor's builds are kept"
    eager = ModelRuntime(compiled.bundle, torch.device("cpu"), 2, None, "float32")

    rng = np.random.default_rng(3)
    images = [rng.random((300, 240), dtype=np.float32) for _ in range(3)]  # a batch of three
    graphs = dynamo_counters["stats"]["unique_graphs"]
    served = compiled.analyse(images)
    assert dynamo_counters["stats"]["unique_graphs"] == graphs, "serving compiled again"
    for ours, reference in zip(served, eager.analyse(images), strict=True):
        assert abs(ours.classification.probability - reference.classification.probability) \
            <= PRECISION_TOLERANCE["probability"]
        assert len(ours.findings) == len(reference.findings) == 4  # one a quadrant
        for box, expected in zip(ours.findings, reference.findings, strict=True):
            assert box.class_name == expected.class_name
            assert abs(box.score - expected.score) <= PRECISION_TOLERANCE["score"]
            assert max(abs(a - b) for a, b in zip(
                (box.x0, box.y0, box.x1, box.y1),
                (expected.x0, expected.y0, expected.x1, expected.y1), strict=True)) \
                <= PRECISION_TOLERANCE["box_px"]


class _DependsOnItsData(torch.nn.Module):
    """Python control flow on a tensor's value: no single graph to compile."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs if inputs.sum().item() > 0 else -inputs


def test_a_model_that_does_not_compile_runs_eager(caplog: pytest.LogCaptureFixture) -> None:
    model = _DependsOnItsData()
    with caplog.at_level(logging.WARNING, logger="workers.compiled"):
        assert compiled_or_eager(model, torch.ones(2, 3), probabilities_agree, "odd") is model
    assert "odd: not compiled" in caplog.text and "it runs eager" in caplog.text


def test_a_compiled_model_that_disagrees_runs_eager(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Conv2d(3, 4, 3).eval()
    example = torch.randn(2, 3, 8, 8)
    agreeing = compiled_or_eager(model, example, probabilities_agree, "conv")
    assert isinstance(agreeing, FixedBatch)
    with torch.inference_mode():
        # Whole multiples of its batch go through the compiled model, any other batch eager.
        for batch in (2, 4, 3):
            inputs = torch.randn(batch, 3, 8, 8)
            assert torch.allclose(agreeing(inputs), model(inputs), atol=1e-5)
    with caplog.at_level(logging.WARNING, logger="workers.compiled"):
        assert compiled_or_eager(model, example, lambda *_: "they differ", "conv") is model
    assert "conv: compiled, but they differ; it runs eager" in caplog.text


def test_a_compiled_model_is_checked_against_its_reference() -> None:
    # An int8 member (workers/int8.py) is checked against the float32 member it stands for,
    # not against its own uncompiled graph.
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3).eval()
    example = torch.randn(2, 3, 8, 8)
    elsewhere = torch.nn.Conv2d(3, 4, 3).eval()  # other weights: other probabilities
    assert compiled_or_eager(model, example, probabilities_agree, "conv",
                             reference=elsewhere) is model
    near = copy.deepcopy(model)
    with torch.no_grad():
        near.bias += 0.01  # logits 0.01 apart: probabilities within 0.0025
    assert isinstance(compiled_or_eager(model, example, probabilities_agree, "conv",
                                        reference=near), FixedBatch)
