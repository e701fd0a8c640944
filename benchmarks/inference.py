"""Inference benchmark: the worker's runtime vs plain eager PyTorch, per image, same run.

Full-size random-weight models (DenseNet-121, EfficientNetV2-S, ResNet-50 at 384 px with 5 TTA
views each, YOLO11-l at 640 px) on one 2500x2000 radiograph. Prints seconds per image for plain
eager PyTorch (NCHW float32, what a straightforward implementation does) and for our runtime in
each precision it offers on this machine (and bfloat16 where oneDNN only emulates it, which the
runtime never chooses; and int8 members, workers/int8.py, beside each detector precision; and
the models compiled at load, compile_models, in the float precision the runtime picks first and
with int8 members), the
achieved GFLOP/s against a float32 (and bfloat16) GEMM measured in the same run as the machine's
practical peak (the faster of MKL's and oneDNN's), and how far our outputs are from eager's.
Random weights: the deviation says nothing about a trained bundle, which must be checked
again (its manifest's validated_precisions).

    .venv/bin/python benchmarks/inference.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.bundles import make_test_bundle  # noqa: E402
from training.export import calibrate_int8  # noqa: E402
from training.synthetic import radiograph_pixels  # noqa: E402
from workers.bundle import ValidatedPrecisions, load_bundle, write_manifest  # noqa: E402
from workers.dernet import build_member, classifier_input, tta_views  # noqa: E402
from workers.detector import bundled_detection_model, letterbox  # noqa: E402
from workers.offline import ultralytics_modules  # noqa: E402
from workers.runtime import ModelRuntime, cpu_has_native_bfloat16  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, oneDNN primitive caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate_every_member(path: Path) -> None:
    """Every member of the bundle at ``path`` in int8, calibrated as export does, on two
    synthetic radiographs (not the image a benchmark times); export would keep a member in
    float32 where its check failed."""
    calibration = [radiograph_pixels(2500, 2000, 12, seed).astype(np.float32) / 4095
                   for seed in (1, 2)]
    calibrate_int8(path, {member.architecture: calibration
                          for member in load_bundle(path).manifest.classifier.members})


def gemm_gflops(dtype: torch.dtype, repeats: int, n: int = 4096) -> dict[str, float]:
    """The machine's practical peak: the best of several large square matrix products, by each
    of the two libraries PyTorch has for them. torch.mm in float32 is MKL's, which on AMD CPUs
    runs a code path of half the speed; oneDNN's (what our convolutions run on) is not."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a_onednn, b_onednn = a.to_mkldnn(), b.to_mkldnn()
    products = {"torch.mm": lambda: torch.mm(a, b),
                # a @ b.T: the same work
                "oneDNN": lambda: torch._C._nn.mkldnn_linear(a_onednn, b_onednn, None)}
    rates = {}
    for name, product in products.items():
        product()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * n**3 / best / 1e9
    return rates


class Eager:
    """The reference: the same models and inputs, plain eager PyTorch, nothing tuned."""

    def __init__(self, bundle):
        spec = bundle.manifest.classifier
        self.spec = spec
        self.members = []
        for member in spec.members:
            model = build_member(member.architecture)
            model.load_state_dict(torch.load(bundle.file(member.weights), weights_only=True))
            self.members.append((member.architecture, member.ensemble_weight, model.eval()))
        self.detector = bundled_detection_model(bundle)
        self.detector_spec = bundle.manifest.detector

    @torch.inference_mode()
    def run(self, image: np.ndarray) -> tuple[dict[str, float], torch.Tensor]:
        views = tta_views(classifier_input(image, self.spec)[None], self.spec.tta)
        members = {name: torch.sigmoid(model(views)).mean().item()
                   for name, _, model in self.members}
        raw = self.detector(letterbox(image, self.detector_spec.image_size)[0][None])
        prediction = raw[0] if isinstance(raw, (list, tuple)) else raw
        boxes = ultralytics_modules().non_max_suppression(
            prediction, conf_thres=self.detector_spec.confidence,
            iou_thres=self.detector_spec.nms_iou, max_det=300)
        return members, boxes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        native = cpu_has_native_bfloat16()
        # oneDNN runs bfloat16 on any AVX-512 CPU, emulated where the CPU lacks it: measured
        # here too, as the reason the runtime does not choose it there.
        emulated = not native and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        precisions = ["float32"] + (["bfloat16"] if native or emulated else [])
        path = make_test_bundle(Path(folder) / "bundle", input_size=384, image_size=640,
                                scale="l", validated_precisions=tuple(precisions))
        calibrate_every_member(path)
        bundle = load_bundle(path)
        torch.set_num_threads(args.threads)
        image = np.random.default_rng(0).random((2500, 2000), dtype=np.float32)
        eager = Eager(bundle)
        torch.set_num_threads(args.threads)
        with FlopCounterMode(display=False) as counter:
            eager.run(image)
        gflop = counter.get_total_flops() / 1e9
        eager_seconds = median_seconds(lambda: eager.run(image), args.repeats)
        eager_members, _ = eager.run(image)
        gemms = {"float32": gemm_gflops(torch.float32, args.repeats)}
        if "bfloat16" in precisions:
            gemms["bfloat16"] = gemm_gflops(torch.bfloat16, args.repeats)
        peaks = {dtype: max(rates.values()) for dtype, rates in gemms.items()}
        print(f"{args.threads} threads, {gflop:.0f} GFLOP per image (3 members x 5 TTA at 384 "
              f"+ YOLO11-l at 640)")
        print("GEMM peak (the faster library): " + ", ".join(
            f"{dtype} {peaks[dtype]:.0f} GFLOP/s ("
            + ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items()) + ")"
            for dtype, rates in gemms.items()))
        print(f"{'eager PyTorch (float32, NCHW)':54s} {eager_seconds:6.2f} s/image  "
              f"{gflop / eager_seconds:6.0f} GFLOP/s  "
              f"{gflop / eager_seconds / peaks['float32']:5.1%} of float32 GEMM")
        # Each precision for both components, then (where bfloat16 exists) the members in
        # bfloat16 with the detector in float32: what a bundle whose detector failed its
        # bfloat16 check at export gets.
        settings = [{"classifier": [p], "detector": [p]} for p in precisions]
        if native:
            settings.append({"classifier": ["bfloat16"], "detector": ["float32"]})
        # int8 members (workers/int8.py) with each detector precision this CPU serves.
        settings += [{"classifier": ["int8"], "detector": [p]} for p in precisions
                     if not (emulated and p == "bfloat16")]
        runs = [(validated, False) for validated in settings]
        # Compiled at load (compile_models, workers/compiled.py): both components in the float
        # precision the runtime picks first on this CPU, and what it picks first of all, int8
        # members (compiled in any case) beside that detector compiled.
        best = "bfloat16" if native else "float32"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder) / "inductor")  # a first start
        runs.append(({"classifier": [best], "detector": [best]}, True))
        runs.append(({"classifier": ["int8"], "detector": [best]}, True))
        for validated, compiled in runs:
            manifest = load_bundle(path).manifest
            write_manifest(path, manifest.model_copy(update={
                "validated_precisions": ValidatedPrecisions(**validated)}))
            forced = emulated and validated["classifier"] == ["bfloat16"]
            loading = time.perf_counter()
            runtime = ModelRuntime(load_bundle(path), torch.device("cpu"), args.threads, None,
                                   "bfloat16" if forced else "auto", compile_models=compiled)
            loaded = time.perf_counter() - loading
            seconds = median_seconds(lambda r=runtime: r.analyse([image]), args.repeats)
            (result,) = runtime.analyse([image])
            deviation = max(abs(result.classification.member_probabilities[name] - p)
                            for name, p in eager_members.items())
            achieved = gflop / seconds
            peak = (f"{achieved / peaks[runtime.precision]:5.1%} of {runtime.precision} GEMM"
                    if runtime.precision in peaks else f"{'':>5s}    (mixed)      ")
            # Loading compiles: int8 members always, everything with compile_models.
            name = runtime.precision + (", emulated: never chosen" if forced else "") + (
                ", compiled" if compiled else "") + (
                f", loaded in {loaded:.0f} s" if compiled or runtime.classifier.int8_members
                else "")
            print(f"{'spinenode runtime (' + name + ')':54s} {seconds:6.2f} "
                  f"s/image  {achieved:6.0f} GFLOP/s  {peak}   {eager_seconds / seconds:4.2f}x "
                  f"eager   max |dp| vs eager {deviation:.4f}")


if __name__ == "__main__":
    main()
