"""The phantom-trained bundle of ``spinenode demo``: built once, then reused from its folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from training.classify import cross_validate, fit_ensemble
from training.config import load_config
from training.detect import train_detector
from training.export import export_bundle
from training.phantoms import generate
from training.prepare import prepare
from workers.bundle import BundleError, load_bundle

log = logging.getLogger(__name__)
DEMO_SIZE = (384, 288)  # phantom rows x columns


def demo_bundle(folder: Path) -> tuple[Path, Path]:
    """(bundle, phantom data) under ``folder``; trains only when no valid bundle is there."""
    data, run, bundle = folder / "phantoms", folder / "run", folder / "bundle"
    try:
        load_bundle(bundle)
        return bundle, data
    except BundleError:
        pass
    start = time.monotonic()
    config = load_config("demo")
    print("demo: training a phantom bundle (first run only, a few minutes)...", flush=True)
    generate(data, train=120, test=24, height=DEMO_SIZE[0], width=DEMO_SIZE[1], seed=11)
    prepare(data, run, config)
    cross_validate(run, config)
    fit_ensemble(run, config)
    train_detector(run, config.detect)
    export_bundle(run, config, bundle, "spinenode-phantom-demo", "0.1.0")
    print(f"demo: bundle ready in {time.monotonic() - start:.0f} s: {bundle}", flush=True)
    return bundle, data
