"""On a CUDA GPU (benchmarks/gpu.sh runs these where one is lent; elsewhere they are skipped):
the device the node picks by itself, the runtime's results on the GPU against the CPU's, and
export's float16 check, which decides whether the GPU serves a bundle in float16."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.export import PRECISION_TOLERANCE, reduced_precisions, validate_precisions
from training.synthetic import radiograph_pixels
from workers.bundle import load_bundle
from workers.dernet import classifier_input
from workers.detector import letterbox
from workers.runtime import ModelRuntime, select_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def _images() -> list[np.ndarray]:
    return [radiograph_pixels(500, 400, 12, seed).astype(np.float32) / 4095 for seed in (1, 2)]


def test_auto_picks_the_gpu() -> None:
    assert select_device("auto") == torch.device("cuda")
    assert "float16" in reduced_precisions()


def test_the_gpu_gives_the_cpus_results(test_bundle: Path) -> None:
    bundle = load_bundle(test_bundle)
    on_cpu, on_gpu = (ModelRuntime(bundle, torch.device(kind), 0, None, "float32")
                      .analyse(_images()) for kind in ("cpu", "cuda"))
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert abs(a.classification.probability - b.classification.probability) <= \
            PRECISION_TOLERANCE["probability"]
        assert len(a.findings) == len(b.findings)


def test_images_are_resized_on_the_gpu_as_on_the_cpu(test_bundle: Path) -> None:
    spec = load_bundle(test_bundle).manifest
    image = _images()[0]
    on_gpu = torch.from_numpy(image).cuda()
    for source_size in (None, 256):
        classifier = spec.classifier.model_copy(update={"source_size": source_size})
        gpu_input = classifier_input(on_gpu, classifier)
        assert gpu_input.device.type == "cuda"
        # Not bit for bit: the GPU's interpolation sums in another order, and where that
        # moves a value across a float16 rounding step (the cached view), by one step
        # (2**-11 below 1) over the smallest std (0.224): at most 0.0022.
        torch.testing.assert_close(gpu_input.cpu(), classifier_input(image, classifier),
                                   atol=3e-3, rtol=0)
    (gpu_canvas, gpu_geometry), (canvas, geometry) = (letterbox(on_gpu, 256),
                                                      letterbox(image, 256))
    assert gpu_canvas.device.type == "cuda" and gpu_geometry == geometry
    torch.testing.assert_close(gpu_canvas.cpu(), canvas, atol=1e-4, rtol=0)


def test_float16_is_served_only_once_checked(test_bundle: Path, tmp_path: Path) -> None:
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(test_bundle, bundle_dir)
    gpu = torch.device("cuda")
    assert ModelRuntime(load_bundle(bundle_dir), gpu, 0, None).precision == "float32"
    # float16 alone: the int8 check (compiling members on the CPU) took 3 of the run's 8 minutes.
    checks = validate_precisions(bundle_dir, _images(), int8=False)
    assert checks["float16"]["device"] == "cuda"
    passed = checks["float16"]["passed"]
    runtime = ModelRuntime(load_bundle(bundle_dir), gpu, 0, None)
    assert runtime.precision.split("/")[0] == ("float16" if passed["classifier"] else "float32")
    (result,) = runtime.analyse(_images()[:1])
    assert 0 <= result.classification.probability <= 1
