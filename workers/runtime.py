"""The models of one bundle, loaded once per worker process, and the analysis of images."""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from dicom_node.analysis import AnalysisResult
from dicom_node.config import Settings
from workers.bundle import Bundle, load_bundle
from workers.dernet import DERNet, as_float_tensor
from workers.detector import Detector
from workers.int8 import cpu_serves_int8
from workers.offline import prepare_offline

log = logging.getLogger(__name__)


def select_device(requested: str) -> torch.device:
    """The one device parser, for serving and training: ``auto`` (CUDA when present), ``cpu``,
    ``cuda``, ``cuda:N`` or a bare GPU index ``N`` (as ultralytics spells it). A GPU that is not
    there is a ValueError with one line."""
    text = requested.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.isdigit():
        text = f"cuda:{text}"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise ValueError(f"device {requested!r}: use auto, cpu, cuda, cuda:N or a GPU index N")
    device = torch.device(text)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {requested}: no such CUDA GPU here "
                         f"({torch.cuda.device_count()} found)")
    return device


# Each precision the runtime knows, by its name in manifests and settings.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "int8": torch.qint8}


def precision_name(dtype: torch.dtype) -> str:
    return next(name for name, known in DTYPES.items() if known == dtype)


def cpu_has_native_bfloat16() -> bool:
    """bfloat16 in the CPU's own instructions (AVX512-BF16 or AMX on x86). oneDNN also says
    "supported" on any AVX-512 CPU, where it emulates bfloat16: there the full-size models took
    6.62 s an image against float32's 1.85 s (an Ice Lake Xeon, benchmarks/inference.py), so
    that does not count."""
    if not (torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    if platform.machine().lower() in ("x86_64", "amd64"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


def cpu_has_amx() -> bool:
    """AMX on x86 (Intel Xeon since Sapphire Rapids): matrix units for bfloat16 and int8."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and bool(torch.cpu._is_amx_tile_supported()))


def select_precision(requested: str, device: torch.device, bundle: Bundle,
                     component: str, compiled: bool = False) -> torch.dtype:
    """The compute precision of one component ("classifier" or "detector"): a reduced one only
    where the bundle validated it for that component. ``compiled``: its float models will be
    compiled at load (``compile_models``)."""
    validated = getattr(bundle.manifest.validated_precisions, component)
    if requested != "auto":
        if requested not in validated:
            raise ValueError(f"precision {requested} is not validated for the {component} of "
                             f"bundle {bundle.label} (validated: {', '.join(validated)})")
        if requested == "float16" and device.type != "cuda":
            raise ValueError("float16 needs a CUDA device")
        if requested == "int8" and (device.type != "cpu" or not cpu_serves_int8()):
            raise ValueError("int8 needs an x86-64 CPU and a C++ compiler (g++) to build "
                             "its kernels")
        return DTYPES[requested]
    # int8 before native bfloat16: the three members at 384 px on a 2-core AMD EPYC with
    # avx512_bf16 took 0.63 s an image in int8, 0.85 s compiled in bfloat16 (int8_members.py).
    # Not where AMX computes bfloat16 and the members are compiled: there the convolutions are
    # so fast that int8's quantize steps outweigh them (2-core Intel Xeon with AMX, two runs:
    # 0.46 and 0.51 s in int8, 0.40 and 0.43 s compiled in bfloat16; eager bfloat16 0.75 s).
    # A member whose compiled graph fails its check runs eager (workers/compiled.py logs it).
    if (device.type == "cpu" and "int8" in validated and cpu_serves_int8()
            and not (compiled and "bfloat16" in validated and cpu_has_native_bfloat16()
                     and cpu_has_amx())):
        return torch.qint8
    return best_float_precision(device, bundle, component)


def best_float_precision(device: torch.device, bundle: Bundle, component: str) -> torch.dtype:
    """What ``auto`` picks but int8: float16 on CUDA, native bfloat16 on a CPU, where the bundle
    validated it; else float32. Also what an int8 classifier's other members run in."""
    validated = getattr(bundle.manifest.validated_precisions, component)
    if device.type == "cuda" and "float16" in validated:
        return torch.float16
    if device.type == "cpu" and "bfloat16" in validated and cpu_has_native_bfloat16():
        return torch.bfloat16
    return torch.float32


def on_device(images: list[np.ndarray] | list[torch.Tensor],
              device: torch.device) -> list[np.ndarray] | list[torch.Tensor]:
    """The decoded images where the models preprocess them: on a GPU each copied there once for
    both models, then resized there (on an H200 the CPU's resizing, 2500 x 2000 to each model's
    input on 16 threads, took 3.2 ms of float16's 9.7 ms an image at batch 32, benchmarks/gpu.sh,
    with the GPU idle meanwhile); on the CPU as they are."""
    if device.type == "cpu":
        return images
    return [as_float_tensor(image).to(device) for image in images]


class ModelRuntime:
    loads = 0  # how many runtimes this process built: models load once per process

    def __init__(self, bundle: Bundle, device: torch.device, threads: int,
                 normal_min_box_score: float | None, precision: str = "auto",
                 compile_models: bool = False):
        ModelRuntime.loads += 1
        self.bundle = bundle
        self.device = device
        compiled = compile_models and device.type == "cpu"
        classifier_dtype = select_precision(precision, device, bundle, "classifier", compiled)
        detector_dtype = select_precision(precision, device, bundle, "detector", compiled)
        self.normal_min_box_score = normal_min_box_score
        start = time.perf_counter()
        self.detector = Detector(bundle, device, detector_dtype)  # imports ultralytics first
        if threads:
            torch.set_num_threads(threads)
        self.classifier = DERNet(bundle, device, classifier_dtype,
                                 best_float_precision(device, bundle, "classifier"))
        if compiled:
            self.classifier.compile()
            self.detector.compile()
        members = self.classifier.member_dtypes
        int8 = (f" (members: {', '.join(f'{n} {precision_name(d)}' for n, d in members.items())})"
                if self.classifier.int8_members else "")
        log.info("loaded bundle %s on %s, %s%s, in %.1f s (%d torch threads)", bundle.label,
                 device, self.precision, int8, time.perf_counter() - start,
                 torch.get_num_threads())

    @property
    def precision(self) -> str:
        """``bfloat16``, or ``classifier/detector`` (``int8/float32``) where they differ; an int8
        classifier with members in a float precision too is ``int8+bfloat16`` (say)."""
        classifier = precision_name(self.classifier.dtype)
        floats = {precision_name(dtype) for dtype in self.classifier.member_dtypes.values()
                  if dtype != torch.qint8}
        if self.classifier.dtype == torch.qint8 and floats:
            classifier = "+".join(["int8", *sorted(floats)])
        detector = precision_name(self.detector.dtype)
        return classifier if classifier == detector else f"{classifier}/{detector}"

    def analyse(self, images: list[np.ndarray] | list[torch.Tensor],
                confidence: float | None = None) -> list[AnalysisResult]:
        """``confidence``: the detector's score cut-off, if not the bundle's."""
        start = time.perf_counter()
        images = on_device(images, self.device)  # counted in classify_seconds
        classifications = self.classifier.classify(images)
        classified = time.perf_counter()
        detections = self.detector.detect(images, confidence)
        detected = time.perf_counter()
        count = len(images)
        manifest = self.bundle.manifest
        results = []
        for classification, boxes in zip(classifications, detections, strict=True):
            if not classification.abnormal and self.normal_min_box_score is not None:
                # VinDr-SpineXR's rule: on an image called normal keep only confident boxes.
                boxes = [box for box in boxes if box.score >= self.normal_min_box_score]
            results.append(AnalysisResult(
                manifest.name, manifest.version, manifest.clinical_use, classification, boxes,
                classify_seconds=(classified - start) / count,
                detect_seconds=(detected - classified) / count))
        return results


_runtimes: dict[tuple[Path, str, str, bool], ModelRuntime] = {}


def runtime_for(settings: Settings) -> ModelRuntime | None:
    """This process's runtime for the configured bundle, or None when none is configured."""
    if settings.bundle is None:
        return None
    key = (settings.bundle.resolve(), settings.device, settings.precision,
           settings.compile_models)
    if key not in _runtimes:
        prepare_offline(settings.data_dir / "ultralytics")
        # Each weight file's SHA-256 is checked as it is loaded (Bundle.verified_bytes), so
        # hashing them all here first would read every file twice.
        bundle = load_bundle(settings.bundle, verify_checksums=False,
                             public_key=settings.bundle_public_key)
        for mismatch in bundle.manifest.version_mismatches():
            log.warning("bundle %s: %s: its results may differ from those measured when it "
                        "was made", bundle.label, mismatch)
        # What inductor builds (int8 members, compile_models) is kept with the node's data
        # (importing torch's libraries already pointed it at a temporary folder): the next
        # start finds it.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str((settings.data_dir / "inductor").resolve())
        _runtimes[key] = ModelRuntime(bundle, select_device(settings.device),
                                      settings.torch_threads, settings.normal_min_box_score,
                                      settings.precision, settings.compile_models)
    return _runtimes[key]
