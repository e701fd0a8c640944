"""Inference benchmark: the worker's runtime vs plain eager PyTorch, per image, same run.

Full-size random-weight models (DenseNet-121, EfficientNetV2-S, ResNet-50 at 384 px with 5 TTA
views each, YOLO11-l at 640 px) on one 2500x2000 radiograph. Prints seconds per image for plain
eager PyTorch (NCHW float32, what a straightforward implementation does) and for our runtime in
each precision it offers on this machine (and bfloat16 where oneDNN only emulates it, which the
runtime never chooses; and int8 members, workers/int8.py, beside each detector precision; and
the models compiled at load, compile_models, in the float precision the runtime picks first and
with int8 members), the achieved GFLOP/s, and how far our outputs are from eager's. The
reference for the machine's practical peak is a GEMM in each precision measured in the same
run (at its start and its end, the faster kept): float32 and bfloat16 by the faster of MKL's
and oneDNN's, int8 by the kernels int8 members run on (oneDNN's, through inductor). Each row
says what share of that peak it reaches: the seconds its members and its detector would take
at the GEMM peak of the precision each runs in, over the seconds measured; and where its time
goes (classifier, detector; medians of the same calls). An int8 member's first convolution
and head stay float32 (1-2% of its FLOPs) and count at the int8 peak: the ceiling is that much
too fast. So a CPU's ceiling is printed beside what we reach: on one without VNNI or bfloat16
even a perfect int8 kernel leaves the float32 detector's share.
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
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import cpu  # noqa: E402
from dicom_node.analysis import AnalysisResult  # noqa: E402
from tests.support.bundles import make_test_bundle  # noqa: E402
from training.export import calibrate_int8  # noqa: E402
from training.synthetic import radiograph_pixels  # noqa: E402
from workers.bundle import Bundle, ValidatedPrecisions, load_bundle, write_manifest  # noqa: E402
from workers.dernet import build_member, classifier_input, tta_views  # noqa: E402
from workers.detector import bundled_detection_model, letterbox  # noqa: E402
from workers.int8 import convert_member, cpu_serves_int8, x86_quantizer  # noqa: E402
from workers.offline import ultralytics_modules  # noqa: E402
from workers.runtime import DTYPES, ModelRuntime, cpu_has_native_bfloat16, precision_name  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, oneDNN primitive caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_analysis(runtime: ModelRuntime, image: np.ndarray,
                    repeats: int) -> tuple[float, AnalysisResult, float, float]:
    """Median seconds of ``runtime.analyse`` after a warm-up, the last result, and the medians
    of its classifier's and detector's seconds in the same calls."""
    runtime.analyse([image])
    seconds, classify, detect = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        (result,) = runtime.analyse([image])
        seconds.append(time.perf_counter() - start)
        classify.append(result.classify_seconds)
        detect.append(result.detect_seconds)
    return (statistics.median(seconds), result, statistics.median(classify),
            statistics.median(detect))


def calibrated_members_bundle(folder: Path, image_size: int = 64, scale: str = "n") -> Bundle:
    """A full-size random-weight bundle (members at 384 px) in ``folder``, every member
    calibrated in int8, and inductor's cache in ``folder`` (a new worker's first start)."""
    path = make_test_bundle(folder / "bundle", input_size=384, image_size=image_size,
                            scale=scale)
    calibrate_every_member(path)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    return load_bundle(path)


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
    return {name: 2 * n**3 / best_seconds(product, repeats) / 1e9
            for name, product in products.items()}


def best_seconds(fn, repeats: int) -> float:
    """A peak's timing: the fastest of ``repeats`` after a warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def int8_gemm_gops(repeats: int, n: int = 4096) -> float:
    """The int8 peak: a large matrix product quantized and compiled as int8 members are
    (workers/int8.py: torchao's x86 quantizer, inductor with frozen weights), so it runs on
    their kernels (oneDNN's u8 x s8; VNNI or AMX where the CPU has them). Timed as the float
    GEMMs are (the best of the repeats, same size); its activations are quantized on each call,
    as a member's are."""
    import torch._inductor.config as inductor
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    inductor.freezing = True
    inputs = torch.randn(n, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's notes on its own deprecations
        prepared = prepare_pt2e(torch.export.export(torch.nn.Linear(n, n).eval(),
                                                    (inputs,)).module(), x86_quantizer())
        prepared(inputs)  # calibration
        product = torch.compile(convert_member(prepared))
        with torch.inference_mode():
            seconds = best_seconds(lambda: product(inputs), repeats)
    return 2 * n**3 / seconds / 1e9


def gemm_peaks(precisions: list[str], repeats: int) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of each precision's GEMM: the faster library for the float
    ones; int8 where the runtime serves it."""
    peaks = {dtype: max(gemm_gflops(DTYPES[dtype], repeats).values()) for dtype in precisions}
    if cpu_serves_int8():
        try:
            peaks["int8"] = int8_gemm_gops(repeats)
        except Exception as error:  # inductor could not build here: int8 rows get no share
            print(f"no int8 GEMM reference: {error.__class__.__name__}: "
                  f"{(str(error).splitlines() or [''])[0][:200]}", file=sys.stderr)
    return peaks


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
        raw = self.detector(self.detector_input(image))
        prediction = raw[0] if isinstance(raw, (list, tuple)) else raw
        boxes = ultralytics_modules().non_max_suppression(
            prediction, conf_thres=self.detector_spec.confidence,
            iou_thres=self.detector_spec.nms_iou, max_det=300)
        return members, boxes[0]

    def detector_input(self, image: np.ndarray) -> torch.Tensor:
        return letterbox(image, self.detector_spec.image_size)[0][None]

    @torch.inference_mode()
    def gflop(self, image: np.ndarray) -> dict[str, float]:
        """GFLOP per image of each member (by architecture) and of the detector."""
        views = tta_views(classifier_input(image, self.spec)[None], self.spec.tta)
        parts = [(name, lambda m=model: m(views)) for name, _, model in self.members]
        parts.append(("detector", lambda: self.detector(self.detector_input(image))))
        counts = {}
        for name, part in parts:
            with FlopCounterMode(display=False) as counter:
                part()
            counts[name] = counter.get_total_flops() / 1e9
        return counts


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
        # An empty folder for inductor's builds, set before anything compiles (the int8 GEMM
        # does): inductor keeps the first folder it used, and the first row that compiles
        # members should find nothing built, as a new worker does ("loaded in" a first start).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder) / "inductor")
        path = make_test_bundle(Path(folder) / "bundle", input_size=384, image_size=640,
                                scale="l", validated_precisions=tuple(precisions))
        calibrate_every_member(path)
        bundle = load_bundle(path)
        torch.set_num_threads(args.threads)
        image = np.random.default_rng(0).random((2500, 2000), dtype=np.float32)
        eager = Eager(bundle)
        torch.set_num_threads(args.threads)
        parts = eager.gflop(image)
        gflop = sum(parts.values())
        eager_seconds = median_seconds(lambda: eager.run(image), args.repeats)
        eager_members, _ = eager.run(image)
        print(cpu())
        print(f"{args.threads} threads, {gflop:.0f} GFLOP per image: "
              + ", ".join(f"{name} {count:.0f}" for name, count in parts.items())
              + " (3 members x 5 TTA views at 384, YOLO11-l at 640)")
        # Measured now and again after the runs, the faster kept: a shared machine's float32
        # GEMM gave 149 and 116 GFLOP/s in two runs the same hour (a 2-core AMD EPYC), and a
        # depressed peak put a row above its ceiling (101%).
        first_peaks = gemm_peaks(precisions, args.repeats)
        rows = [("eager PyTorch (float32, NCHW)", eager_seconds, dict.fromkeys(parts, "float32"),
                 "")]
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
        # precision the runtime picks first on this CPU, and int8 members (compiled in any case)
        # beside that detector compiled: what compile_models serves where both are validated,
        # the first on a CPU with AMX, the second on others (workers/runtime.py).
        best = "bfloat16" if native else "float32"
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
            seconds, result, classify, detect = median_analysis(runtime, image, args.repeats)
            deviation = max(abs(result.classification.member_probabilities[name] - p)
                            for name, p in eager_members.items())
            served = {name: precision_name(dtype)
                      for name, dtype in runtime.classifier.member_dtypes.items()}
            served["detector"] = precision_name(runtime.detector.dtype)
            # Loading compiles: int8 members always, everything with compile_models.
            name = runtime.precision + (", emulated: never chosen" if forced else "") + (
                ", compiled" if compiled else "") + (
                f", loaded in {loaded:.0f} s" if compiled or runtime.classifier.int8_members
                else "")
            rows.append((f"spinenode runtime ({name})", seconds, served,
                         f"{eager_seconds / seconds:4.2f}x eager   classifier {classify:.2f} s "
                         f"+ detector {detect:.2f} s   max |dp| vs eager {deviation:.4f}"))
            print(f"measured: {rows[-1][0]}", file=sys.stderr, flush=True)
        last_peaks = gemm_peaks(precisions, args.repeats)
        peaks = {dtype: max(first_peaks[dtype], last_peaks[dtype]) for dtype in first_peaks
                 if dtype in last_peaks}  # int8's build may fail at one end only
        print("GEMM peak, the faster library, the better of the run's start and end: " + ", ".join(
            f"{dtype} {peak:.0f} G{'OP' if dtype == 'int8' else 'FLOP'}/s (start "
            f"{first_peaks[dtype]:.0f}, end {last_peaks[dtype]:.0f})"
            for dtype, peak in peaks.items()))
        for label, seconds, served, rest in rows:
            # The seconds each part would take at the GEMM peak of what it runs in, over the
            # seconds it took: 100% is this CPU's ceiling for that choice of precisions.
            share = f"{'':>18s}"
            if set(served.values()) <= set(peaks):
                at_peaks = sum(parts[part] / peaks[dtype] for part, dtype in served.items())
                share = f"{at_peaks / seconds:5.1%} of the GEMMs"
            print(f"{label:54s} {seconds:6.2f} s/image  {gflop / seconds:6.0f} GFLOP/s  {share}  "
                  f"{rest}")


if __name__ == "__main__":
    main()
