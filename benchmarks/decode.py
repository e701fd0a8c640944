"""Decode benchmark: one 2500x2000 12-bit DX as the workers decode it, beside pydicom's own
JPEG 2000 plugin (pylibjpeg-openjpeg, one thread), same run.

For each syntax: seconds per image of ``workers.imaging.decode`` with the codec on every core
(what a worker does with one image: ``decode_all``), with it on one thread, and for JPEG 2000
the same file through pydicom's pylibjpeg plugin with the same normalisation (what the workers
did before workers/jpeg2000.py). Then ``decode_all`` on 4 files per core with a decode process
per core, as a GPU worker's batches go.

    .venv/bin/python benchmarks/decode.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pydicom
from pydicom.pixels import pixel_array

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu import jpeg2000_copies  # noqa: E402
from benchmarks.inference import median_seconds  # noqa: E402
from benchmarks.machine import cpu  # noqa: E402
from training.synthetic import make_radiograph  # noqa: E402
from workers.imaging import decode, decode_all, normalise, usable_cores  # noqa: E402

MAX_PIXELS = 50_000_000


def pydicom_plugin_decode(path: Path) -> None:
    ds = pydicom.dcmread(path)
    normalise(ds, pixel_array(ds, decoding_plugin="pylibjpeg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cores = usable_cores()
    print(f"CPU: {cpu()}; {cores} usable cores")
    with tempfile.TemporaryDirectory(prefix="spinenode-decode-") as tmp:
        plain = make_radiograph(Path(tmp) / "dx.dcm", rows=2500, columns=2000, seed=0)
        (j2k,) = jpeg2000_copies([plain], Path(tmp))
        for name, path in (("uncompressed", plain), ("JPEG 2000 lossless", j2k)):
            ours = median_seconds(lambda p=path: decode(p, MAX_PIXELS, cores), args.repeats)
            one = median_seconds(lambda p=path: decode(p, MAX_PIXELS, 1), args.repeats)
            line = (f"{name:19} one image: ours on {cores} threads {ours:.3f} s, "
                    f"on 1 thread {one:.3f} s")
            if path == j2k:
                reference = median_seconds(lambda p=path: pydicom_plugin_decode(p), args.repeats)
                line += (f", pydicom's pylibjpeg plugin {reference:.3f} s "
                         f"({reference / ours:.2f}x)")
            print(line, flush=True)
            files = [path] * (4 * cores)
            batch = median_seconds(lambda f=files: decode_all(f, MAX_PIXELS, cores), 2)
            print(f"{name:19} decode_all of {len(files)} files in {cores} processes: "
                  f"{len(files) / batch:.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
