"""The line every benchmark prints beside its figures: which CPU made them."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _first(info: str, field: str) -> str | None:
    return next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.split(":", 1)[0].strip() == field), None)


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = _first(info, "model name") or platform.processor()
    # Virtual machines often show a bare "AMD EPYC": family and model tell the kinds apart
    # (family 25 model 17 and family 26 differ 2x in bfloat16 GEMM).
    family, model = _first(info, "cpu family"), _first(info, "model")
    kind = f" (family {family} model {model})" if family and model else ""
    bf16 = "yes" if "avx512_bf16" in info else "no"
    return f"{name}{kind}, {os.cpu_count()} cores, avx512_bf16 {bf16}"
