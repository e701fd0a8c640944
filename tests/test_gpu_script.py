"""benchmarks/gpu.sh, the run prepared for a GPU machine, runs here on the CPU in its smoke size:
the CUDA tests are collected (and skipped without a GPU), and the table has every section, with
the batch sizes and each precision this CPU serves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import torch

from tests.support.bundles import make_test_bundle
from workers.int8 import cpu_serves_int8
from workers.runtime import cpu_has_native_bfloat16

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_script_runs_its_cpu_parts(tmp_path: Path) -> None:
    # One member: the precision check's int8 part compiles each member (three took 2 minutes).
    bundle = make_test_bundle(tmp_path / "bundle", members=(("resnet50", 1.0),))
    result = subprocess.run([str(ROOT / "benchmarks" / "gpu.sh"), "--quick", "--repeats", "1",
                             "--device", "cpu", "--bundle", str(bundle)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    tests = "4 skipped" if not torch.cuda.is_available() else "4 passed"
    assert tests in out
    table = out.split("\n\n")[-1]
    assert "no CUDA GPU: float16 is neither served nor checked" in table
    # The CPU line names the kind (family and model), not only a bare "AMD EPYC".
    assert re.search(r"^CPU: .+ \(family \d+ model \d+\), \d+ cores, avx512_bf16 (yes|no)$",
                     table, re.M)
    assert re.search(r"batch 1\s+batch 2", table)
    rows = {m.group(1): m.group(2) for m in re.finditer(
        r"^  (float32|bfloat16)((?: +\d+\.\d+)+)$", table, re.M)}  # the images/s rows
    assert set(rows) == ({"float32", "bfloat16"} if cpu_has_native_bfloat16() else {"float32"})
    assert all(len(re.findall(r"\d+\.\d\d", rates)) == 2 for rates in rows.values())
    # Where the largest batch's time goes, per precision, and the preprocessing apart.
    splits = re.findall(r"^  (float32|bfloat16) +at batch 2: classifier ([\d.]+) ms/image, "
                        r"detector ([\d.]+) ms/image$", table, re.M)
    assert {name for name, *_ in splits} == set(rows)
    assert all(float(classifier) > 0 and float(detector) > 0 for _, classifier, detector in splits)
    assert re.search(r"preprocessing on the CPU \(\d+ torch threads\): classifier input "
                     r"[\d.]+ ms/image, detector letterbox [\d.]+ ms/image", table)
    for kind in ("uncompressed DX", "JPEG 2000 lossless DX"):
        assert re.search(rf"decode images/s \(4 {kind}\): SPINENODE_DECODE_WORKERS=\d+: "
                         r"[\d.]+, 1 process \(\d+ codec threads\): [\d.]+", table)
    assert bool(re.search(r"bfloat16 +on cpu .* -> classifier (passed|FAILED), detector",
                          table)) == cpu_has_native_bfloat16()
    assert bool(re.search(r"int8 +on cpu +\|dp\| [\d.]+ +\(int8 members: [a-z0-9_, ]+\) +-> "
                          r"classifier (passed|FAILED)$", table, re.M)) == cpu_serves_int8()
    assert re.search(r"^gpu\.sh: \d+ s$", out, re.M)
