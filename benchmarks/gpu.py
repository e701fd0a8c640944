"""The accelerator run, one table: what a bundle's reduced precision is worth here and whether it
passes its check, images/s of the full-size models by batch and precision, and decode images/s
with one process per core beside one process. `benchmarks/gpu.sh` runs the CUDA tests and then
this; on a machine without a GPU it runs what the CPU can (float32, bfloat16 where native).

    .venv/bin/python benchmarks/gpu.py [--device auto] [--demo | --bundle PATH] [--quick]

On a CUDA device `--demo` is the default.

- Precision check (export's, `training.export.validate_precisions`): float16 on a CUDA GPU,
  bfloat16 on a CPU that has it natively, int8 members on an x86-64 CPU, against float32 on the
  same device, per component,
  within the export tolerance. `--demo` trains the phantom demo bundle on the device first (its
  export checks and records it: the first training on a GPU too); `--bundle` checks a trained
  bundle on synthetic radiographs (its manifest is rewritten with the result).
- Images/s: `ModelRuntime.analyse` (the worker's path: preprocessing, 5 TTA views, DERNet's
  three members at 384 px, YOLO11-l at 640 px and NMS) on 2500x2000 radiographs, random weights,
  batch 1/8/32, in every precision the device serves; then where the largest batch's time goes
  (classifier, detector) and the preprocessing apart, where the runtime does it (on a GPU: one
  copy of each image there, then the resizing there).
- Decode: 2500x2000 DX files, uncompressed and JPEG 2000 lossless, through `decode_all` with
  SPINENODE_DECODE_WORKERS = the cores, beside one process (which decodes a JPEG 2000 frame on
  a thread per core): what the GPU can be fed.

`--quick` makes everything tiny (a smoke test of this script on a CPU, run by the tests).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pydicom
import torch
from pydicom.uid import JPEG2000Lossless

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.inference import median_seconds  # noqa: E402
from benchmarks.machine import cpu  # noqa: E402
from tests.support.bundles import make_test_bundle  # noqa: E402
from training.synthetic import make_radiograph  # noqa: E402
from workers.bundle import Bundle, load_bundle  # noqa: E402
from workers.dernet import classifier_input  # noqa: E402
from workers.detector import letterbox  # noqa: E402
from workers.imaging import decode, decode_all, usable_cores  # noqa: E402
from workers.offline import prepare_offline  # noqa: E402
from workers.runtime import (  # noqa: E402
    ModelRuntime,
    cpu_has_native_bfloat16,
    on_device,
    select_device,
)

MAX_PIXELS = 50_000_000


def served_precisions(device: torch.device) -> list[str]:
    """The precisions the runtime serves on this device (given a bundle validated in them)."""
    if device.type == "cuda":
        return ["float32", "float16"] + (["bfloat16"] if torch.cuda.is_bf16_supported() else [])
    return ["float32"] + (["bfloat16"] if cpu_has_native_bfloat16() else [])


def precision_rows(args: argparse.Namespace, device: torch.device, work: Path,
                   radiographs: list[Path]) -> list[str]:
    from training.export import reduced_precisions, validate_precisions

    if args.demo:
        from training.demo_bundle import train_demo_bundle
        from training.demo_data import demo_phantoms

        folder = work / "demo"
        demo_phantoms(folder)
        began = time.perf_counter()
        bundle = train_demo_bundle(folder, device="cpu" if device.type == "cpu"
                                   else str(device.index or 0))
        # What export measured and recorded, as the workers read it.
        checks = dict(load_bundle(bundle).manifest.metrics.get("precision_check", {}))
        checks.pop("tolerance", None)
        trained = (f"demo bundle trained and exported on {device.type} in "
                   f"{time.perf_counter() - began:.0f} s")
    elif args.bundle:
        images = [decode(path).pixels for path in radiographs]
        checks = validate_precisions(args.bundle, images)
        trained = f"{args.bundle} on {len(images)} synthetic radiographs"
    else:
        return ["precision check: skipped (give --demo or --bundle PATH)"]
    if not checks:
        return [f"precision check ({trained}): no reduced precision to check on this machine "
                f"(checked here: {', '.join(reduced_precisions()) or 'none'})"]
    rows = [f"precision check ({trained}; tolerance |dp| 0.01, boxes 0.5 px, scores 0.01):"]
    for name, check in checks.items():
        d = check["differences"]
        verdict = ", ".join(f"{component} {'passed' if ok else 'FAILED'}"
                            for component, ok in check["passed"].items())
        detector = (f"boxes {d['box_px']:.3f} px  scores {d['score']:.4f}" if "box_px" in d
                    else f"(int8 members: {', '.join(check['int8_members']) or 'none'})")
        rows.append(f"  {name:9} on {check['device']:4}  |dp| {d['probability']:.4f}  "
                    f"{detector}  -> {verdict}")
    return rows


def throughput_rows(args: argparse.Namespace, device: torch.device, work: Path,
                    radiographs: list[Path]) -> list[str]:
    input_size, image_size, scale = (64, 64, "n") if args.quick else (384, 640, "l")
    batches = (1, 2) if args.quick else (1, 8, 32)
    precisions = served_precisions(device)
    bundle_dir = make_test_bundle(work / "full-size", input_size=input_size,
                                  image_size=image_size, scale=scale,
                                  validated_precisions=precisions)
    bundle = load_bundle(bundle_dir)
    pixels = [decode(path).pixels for path in radiographs]
    images = [pixels[i % len(pixels)] for i in range(max(batches))]
    rows = [f"images/s, ModelRuntime.analyse on {pixels[0].shape[1]}x{pixels[0].shape[0]} "
            f"radiographs (DERNet at {input_size} px x 5 TTA views, YOLO11{scale} at "
            f"{image_size} px, random weights):",
            f"  {'precision':9} " + " ".join(f"{'batch ' + str(b):>9}" for b in batches)]
    splits = []
    for precision in precisions:
        runtime = ModelRuntime(bundle, device, 0, None, precision)
        rates = [b / median_seconds(lambda b=b, r=runtime: r.analyse(images[:b]), args.repeats)
                 for b in batches]
        rows.append(f"  {precision:9} " + " ".join(f"{rate:9.2f}" for rate in rates))
        splits.append(time_split(runtime, precision, images))
        del runtime
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows + splits + [preprocessing_row(bundle, images, device)]


def time_split(runtime: ModelRuntime, precision: str, images: list) -> str:
    """Where one largest batch's time goes: the classifier's and the detector's share of
    ``analyse`` (each with its own preprocessing, `preprocessing_row`; the classifier's with
    the images' copy to the GPU too)."""
    result = runtime.analyse(images)[0]
    return (f"  {precision:9} at batch {len(images)}: classifier "
            f"{1000 * result.classify_seconds:.1f} ms/image, detector "
            f"{1000 * result.detect_seconds:.1f} ms/image")


def preprocessing_row(bundle: Bundle, images: list, device: torch.device) -> str:
    """Each image's way to the models' inputs (2500x2000 -> each model's input), apart, where
    ``ModelRuntime.analyse`` does it: on a GPU one copy there, then the resizing there."""
    spec = bundle.manifest

    def timed(work) -> float:  # noqa: ANN001
        def finished() -> None:
            work()
            if device.type == "cuda":
                torch.cuda.synchronize()  # the GPU's work is queued: wait until it is done
        return median_seconds(finished, 2) / len(images)

    copy, placed = timed(lambda: on_device(images, device)), on_device(images, device)
    classifier = timed(lambda: [classifier_input(i, spec.classifier) for i in placed])
    detector = timed(lambda: [letterbox(i, spec.detector.image_size) for i in placed])
    where = (f"the CPU ({torch.get_num_threads()} torch threads)" if device.type == "cpu"
             else f"{device.type}, after a copy there of {1000 * copy:.1f} ms/image")
    return (f"  preprocessing on {where}: classifier input {1000 * classifier:.1f} ms/image, "
            f"detector letterbox {1000 * detector:.1f} ms/image")


def decode_rows(args: argparse.Namespace, radiographs: list[Path], work: Path) -> list[str]:
    """Decode with a process per core beside one process, for uncompressed files and for JPEG
    2000 lossless ones (what many PACS send, and the costliest codec here per image)."""
    cores = usable_cores()  # as decode_all shares them out
    count = max(2 * cores, 4)
    rows = []
    for kind, files in (("uncompressed DX", radiographs),
                        ("JPEG 2000 lossless DX", jpeg2000_copies(radiographs, work))):
        paths = [files[i % len(files)] for i in range(count)]
        # One process on a few of them: its rate per image does not need them all (on an H200's
        # 16 cores, 32 JPEG 2000 files took one process 40 s a pass).
        few = paths[:4]
        one = len(few) / median_seconds(lambda p=few: decode_all(p, MAX_PIXELS, 1),
                                        args.repeats)
        many = count / median_seconds(lambda p=paths: decode_all(p, MAX_PIXELS, cores),
                                      args.repeats)
        # One process decodes a JPEG 2000 frame on every core's thread (workers/jpeg2000.py).
        rows.append(f"decode images/s ({count} {kind}): SPINENODE_DECODE_WORKERS={cores}: "
                    f"{many:.1f}, 1 process ({cores} codec threads): {one:.1f} "
                    f"({many / one:.2f}x)")
    return rows


def jpeg2000_copies(radiographs: list[Path], work: Path) -> list[Path]:
    copies = []
    for path in radiographs:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        copies.append(work / f"j2k-{path.name}")
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--demo", action="store_true",
                        help="train the demo bundle on the device and show its precision check")
    parser.add_argument("--bundle", type=Path, help="check this trained bundle instead")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = select_device(args.device)
    # On a GPU the whole run by default: the demo bundle trained, exported and checked there.
    args.demo = args.demo or (device.type == "cuda" and not args.bundle and not args.quick)
    gpu = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
           if device.type == "cuda" else "no CUDA GPU: float16 is neither served nor checked")
    lines = [f"CPU: {cpu()}", f"device: {device} ({gpu}); torch {torch.__version__}"]
    with tempfile.TemporaryDirectory(prefix="spinenode-gpu-") as tmp:
        work = Path(tmp)
        prepare_offline(work / "ultralytics")
        rows, columns = (256, 200) if args.quick else (2500, 2000)
        radiographs = [make_radiograph(work / f"dx{seed}.dcm", rows=rows, columns=columns,
                                       seed=seed) for seed in range(4)]
        # The demo bundle's training, the longest part, last: a run cut short keeps the rest.
        failed = False
        for name, section in (
                ("throughput", lambda: throughput_rows(args, device, work, radiographs)),
                ("decode", lambda: decode_rows(args, radiographs, work)),
                ("precision check", lambda: precision_rows(args, device, work, radiographs))):
            began = time.perf_counter()
            try:
                rows = section()
            except Exception as error:  # one lease is short: a failed part keeps the others
                traceback.print_exc()
                rows, failed = [f"{name}: FAILED ({error!r})"], True
            lines += rows
            # Progress while the rest runs: a run cut short still shows what it measured.
            print("\n".join(rows) + f"\n({time.perf_counter() - began:.0f} s)", flush=True)
    print("\n" + "\n".join(lines))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
