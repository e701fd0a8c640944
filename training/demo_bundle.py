"""Training the phantom bundle of ``spinenode demo`` (``training.demo_data`` makes the phantoms
and finds a bundle already built under the same recipe)."""

from __future__ import annotations

import time
from pathlib import Path

from training.classify import cross_validate, fit_ensemble
from training.config import load_config, torch_device
from training.demo_data import DEMO_VERSION
from training.detect import train_detector
from training.export import export_bundle
from training.prepare import prepare


def train_demo_bundle(folder: Path, device: str = "cpu") -> Path:
    """Train the demo bundle on the phantoms under ``folder`` (``demo_phantoms`` made them) on
    ``device`` (as ``spinenode train --device`` takes it); a run interrupted under this recipe
    resumes."""
    data, run, bundle = folder / "phantoms", folder / "run", folder / "bundle"
    start = time.monotonic()
    config = load_config("demo")
    print("demo: training a phantom bundle (first run only, 5 to 12 minutes on 2 cores)...",
          flush=True)

    def done(step: str) -> None:
        print(f"demo: {step} ({time.monotonic() - start:.0f} s)", flush=True)

    prepare(data, run, config)
    done("phantoms prepared")
    cross_validate(run, config, torch_device(device))
    fit_ensemble(run, config)
    done("DERNet members trained, ensemble fitted")
    train_detector(run, config.detect, device=device)
    done("YOLO11 trained")
    export_bundle(run, config, bundle, "spinenode-phantom-demo", DEMO_VERSION)
    print(f"demo: bundle ready in {time.monotonic() - start:.0f} s: {bundle}", flush=True)
    return bundle

