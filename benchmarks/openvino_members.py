"""OpenVINO beside ours, member by member: the candidate second backend of issue 15, point 1.

Each full-size random-weight member (384 px, 5 TTA views of one 2500x2000 radiograph), the same
weights in each row: ours as the worker serves it (``DERNet.view_probabilities``: float32, and
int8 calibrated as export does and compiled by inductor), and OpenVINO's CPU plugin on the
model converted from PyTorch, in float32 (its Winograd convolutions included) and in int8
(NNCF's post-training quantization on the calibration radiographs ours uses); seconds per image,
the ratio to our float32, and each int8's largest probability difference from float32 on the
timed image's views (export's check allows 0.01, on a trained member). Not a dependency of the
node: OpenVINO and NNCF go into a venv of their own beside the worker's lock,

    python3 -m venv /tmp/ovenv && /tmp/ovenv/bin/pip install --no-deps -r locks/worker.txt
    /tmp/ovenv/bin/pip install --no-deps -e . && /tmp/ovenv/bin/pip install openvino nncf
    /tmp/ovenv/bin/python benchmarks/openvino_members.py [--repeats 5]

OpenVINO and NNCF report usage statistics (openvino-telemetry) unless its consent file says
no: run `/tmp/ovenv/bin/opt_in_out --opt_out` first, and run this offline. OpenVINO in the node
itself would have to make that sure, under the no-network test (issue 15).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.inference import calibrated_members_bundle, median_seconds  # noqa: E402
from benchmarks.machine import cpu  # noqa: E402
from training.synthetic import radiograph_pixels  # noqa: E402
from workers.bundle import Bundle  # noqa: E402
from workers.dernet import DERNet, tta_views  # noqa: E402
from workers.detector import Detector, letterbox, prediction_differences  # noqa: E402


def openvino_members(dernet: DERNet, views: torch.Tensor, calibration: list[torch.Tensor]
                     ) -> dict[str, dict[str, object]]:
    """Architecture -> {"float32": compiled model, "int8": compiled model} in OpenVINO."""
    import nncf
    import openvino as ov

    core = ov.Core()
    # On a CPU with bfloat16 OpenVINO would take it by default; this row is float32.
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    models = {}
    for name, _, model in dernet.members:
        converted = ov.convert_model(model, example_input=views)
        quantized = nncf.quantize(converted, nncf.Dataset([c.numpy() for c in calibration]),
                                  subset_size=len(calibration))
        models[name] = {"float32": core.compile_model(converted, "CPU", config),
                        "int8": core.compile_model(quantized, "CPU", config)}
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"CPU: {cpu()}; {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as folder:
        bundle = calibrated_members_bundle(Path(folder), image_size=640, scale="l")
        ours = {"float32": DERNet(bundle, torch.device("cpu")),
                "int8": DERNet(bundle, torch.device("cpu"), torch.qint8)}
        image = np.random.default_rng(0).random((2500, 2000), dtype=np.float32)
        inputs = ours["float32"].inputs([image])
        views = tta_views(inputs, list(bundle.manifest.classifier.tta))
        calibration = [tta_views(ours["float32"].inputs(
            [radiograph_pixels(2500, 2000, 12, seed).astype(np.float32) / 4095]),
            list(bundle.manifest.classifier.tta)) for seed in (1, 2)]
        theirs = openvino_members(ours["float32"], views, calibration)
        columns = ["ours float32", "ours int8", "OpenVINO float32", "OpenVINO int8"]
        print(f"{'member (5 views at 384 px)':28s}" + "".join(f"{c:>22s}" for c in columns)
              + "   |dp| int8: ours, OpenVINO")
        for name, _, _ in ours["float32"].members:
            def ov_probabilities(kind: str, n: str = name) -> torch.Tensor:
                return torch.sigmoid(torch.from_numpy(theirs[n][kind](views.numpy())[0]))

            run = {"ours float32": lambda n=name: ours["float32"].view_probabilities(inputs, n),
                   "ours int8": lambda n=name: ours["int8"].view_probabilities(inputs, n),
                   "OpenVINO float32": lambda: ov_probabilities("float32"),
                   "OpenVINO int8": lambda: ov_probabilities("int8")}
            seconds = {column: median_seconds(run[column], args.repeats) for column in columns}
            exact = ours["float32"].view_probabilities(inputs, name)[name].flatten()
            ours_dp = (ours["int8"].view_probabilities(inputs, name)[name].flatten() - exact)
            theirs_dp = ov_probabilities("int8").flatten() - exact
            reference = seconds["ours float32"]
            print(f"{name:28s}" + "".join(f"{f'{s:.3f} s ({reference / s:.2f}x)':>22s}"
                                          for s in seconds.values())
                  + f"   {ours_dp.abs().max():.4f}, {theirs_dp.abs().max():.4f}")
        detector_row(bundle, image, args.repeats)


class RawPredictions(torch.nn.Module):
    """ultralytics' model less the feature maps it returns beside the predictions, which
    OpenVINO's converter cannot trace (a tuple holding a tensor and a list)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        raw = self.model(batch)
        return raw[0] if isinstance(raw, (list, tuple)) else raw


def detector_row(bundle: Bundle, image: np.ndarray, repeats: int) -> None:
    """YOLO11 at the bundle's size in float32, ours and OpenVINO's (Winograd and all), and
    how far OpenVINO's raw boxes and scores are from ours (export's check allows 0.5 px and
    0.01)."""
    import openvino as ov

    detector = Detector(bundle, torch.device("cpu"))
    batch = letterbox(image, bundle.manifest.detector.image_size)[0][None]
    batch = batch.contiguous(memory_format=torch.channels_last)
    # The head makes its anchors for this size at its first call and keeps them: made here
    # outside inference mode (the converter traces with autograd on), before the converter's
    # two tracings, which would otherwise see them made in one and kept in the other.
    raw = RawPredictions(detector.model)
    with torch.no_grad():
        raw(batch)
    ours = median_seconds(lambda: detector.raw_predictions(batch), repeats)
    compiled = ov.Core().compile_model(
        ov.convert_model(raw, example_input=batch), "CPU",
        {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    theirs = median_seconds(lambda: compiled(batch.numpy()), repeats)
    differences = prediction_differences(detector.raw_predictions(batch),
                                         torch.from_numpy(compiled(batch.numpy())[0]))
    print(f"{'detector (' + bundle.manifest.detector.scale + ', float32)':28s}"
          f"{f'{ours:.3f} s (1.00x)':>22s}{'':>22s}{f'{theirs:.3f} s ({ours / theirs:.2f}x)':>22s}"
          f"   boxes {differences['box_px']:.4f} px, scores {differences['score']:.5f}")


if __name__ == "__main__":
    main()
