"""End-to-end latency: storescu -> Orthanc -> (auto-route) spinenode -> SR stored in Orthanc.

One image at a time (2500x2000 12-bit DX), the clock running from the start of `storescu` to
the moment Orthanc's REST API lists the SR in that study. Prints p50 and p95 over the images,
with the tiny test bundle or (--full) full-size random-weight models (384 px members with 5 TTA
views, YOLO11-l at 640) on this CPU.

    .venv/bin/python benchmarks/latency.py [--images 20] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicom_node.cli.common import free_port  # noqa: E402
from tests.support.bundles import make_test_bundle  # noqa: E402
from tests.support.dcmtk import put_dcmtk_first_on_path  # noqa: E402
from tests.support.node import NodeProcess, storescu  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402
from training.synthetic import make_radiograph  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--full", action="store_true", help="full-size random-weight models")
    args = parser.parse_args()
    put_dcmtk_first_on_path()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        bundle = (make_test_bundle(work / "bundle", input_size=384, image_size=640, scale="l")
                  if args.full else make_test_bundle(work / "bundle"))
        node_port = free_port()
        orthanc = Orthanc(work / "orthanc", node_port)
        node = NodeProcess(work / "var", f"sqlite:///{work / 'var' / 'spinenode.sqlite'}",
                           port=node_port, env={
                               "SPINENODE_BUNDLE": str(bundle), "SPINENODE_LOG_LEVEL": "WARNING",
                               "SPINENODE_DESTINATIONS":
                                   f"ORTHANC@127.0.0.1:{orthanc.dicom_port}/sr+sc"})
        try:
            node.start()
            latencies = []
            for index in range(args.images):
                path = make_radiograph(work / f"{index}.dcm", rows=2500, columns=2000,
                                       seed=index)
                study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                start = time.perf_counter()
                result = storescu(orthanc.dicom_port, [path], called_ae="ORTHANC")
                assert result.returncode == 0, result.stderr
                deadline = start + 600
                while time.perf_counter() < deadline:
                    if orthanc.has_series(study, "SR"):
                        break
                    time.sleep(0.05)
                else:
                    raise RuntimeError(f"no SR for image {index} after 600 s")
                latencies.append(time.perf_counter() - start)
                print(f"image {index + 1:2d}: {latencies[-1]:6.2f} s", flush=True)
        finally:
            node.stop()
            orthanc.stop()
    kind = "full-size random-weight models" if args.full else "test bundle (64 px, YOLO11-n)"
    print(f"{kind}, {len(latencies)} images one at a time: p50 "
          f"{statistics.median(latencies):.2f} s, p95 {percentile(latencies, 0.95):.2f} s")


if __name__ == "__main__":
    main()
