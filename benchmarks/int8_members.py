"""int8 members one by one: which DERNet member gains from int8 on this CPU, and which does not.

Each full-size random-weight member (384 px, 5 TTA views of one 2500x2000 radiograph) as the
worker serves it (``DERNet.view_probabilities``): float32 (the reference), float32 compiled at
load (``compile_models``), int8 (``workers/int8.py``: calibrated as export does on two synthetic
radiographs, compiled by inductor) and, where the CPU has native bfloat16, bfloat16 eager and
compiled; seconds per image and the ratio to float32, same run. The runtime takes int8 for every
member whose export check passed, before bfloat16: this says what that gains or costs.

    .venv/bin/python benchmarks/int8_members.py [--repeats 5] [--threads 2]
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
from workers.dernet import DERNet  # noqa: E402
from workers.runtime import cpu_has_native_bfloat16  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu()}; {args.threads} threads")
    with tempfile.TemporaryDirectory() as folder:
        bundle = calibrated_members_bundle(Path(folder))
        compiled = DERNet(bundle, torch.device("cpu"))
        compiled.compile()
        served = {"float32": DERNet(bundle, torch.device("cpu")), "float32 compiled": compiled,
                  "int8": DERNet(bundle, torch.device("cpu"), torch.qint8)}
        if cpu_has_native_bfloat16():
            served["bfloat16"] = DERNet(bundle, torch.device("cpu"), torch.bfloat16)
            served["bfloat16 compiled"] = DERNet(bundle, torch.device("cpu"), torch.bfloat16)
            served["bfloat16 compiled"].compile()
        image = np.random.default_rng(0).random((2500, 2000), dtype=np.float32)
        inputs = served["float32"].inputs([image])
        print(f"{'member (5 views at 384 px)':24s}" + "".join(f"{name:>24s}" for name in served))
        for member in bundle.manifest.classifier.members:
            name = member.architecture
            seconds = {kind: median_seconds(
                lambda d=dernet, n=name: d.view_probabilities(inputs, only=n), args.repeats)
                for kind, dernet in served.items()}
            reference = seconds["float32"]
            print(f"{name:24s}" + "".join(
                f"{f'{s:.3f} s ({reference / s:.2f}x)':>24s}" for s in seconds.values()))


if __name__ == "__main__":
    main()
