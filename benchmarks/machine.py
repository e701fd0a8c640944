"""The line every benchmark prints beside its figures: which CPU made them."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines()
                  if line.startswith("model name")), platform.processor())
    bf16 = "yes" if "avx512_bf16" in flags else "no"
    return f"{model}, {os.cpu_count()} cores, avx512_bf16 {bf16}"
