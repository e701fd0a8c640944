"""The phantom-trained bundle of ``spinenode demo``: built once, then reused from its folder.
The phantoms come first (seconds), so that the demo node can take images while the bundle
trains."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from training.classify import cross_validate, fit_ensemble
from training.config import load_config, torch_device
from training.detect import train_detector
from training.export import export_bundle
from training.phantoms import conditions_path, generate
from training.prepare import prepare
from workers.bundle import BundleError, load_bundle

log = logging.getLogger(__name__)
# Varied phantoms (three difficulty bands, 4-7 levels, both photometrics), their long side from
# 300 to 1,500 px: the generator goes to 3,000, which doubles the demo's data for no new look.
DEMO_SIZES = (300, 1500)
DEMO_VERSION = "0.3.0"  # change it with the phantoms or training/configs/demo.yaml


def demo_phantoms(folder: Path) -> Path:
    """The phantom data under ``folder``, made once per recipe: 240 to train on, 100 held out
    for the demo to send and to measure the bundle. A folder from an older recipe starts
    afresh (its phantoms, cached steps and bundle belong to that recipe)."""
    data, recipe = folder / "phantoms", folder / "recipe"
    if not recipe.exists() or recipe.read_text() != DEMO_VERSION:
        for stale in (data, folder / "run", folder / "bundle"):
            shutil.rmtree(stale, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        recipe.write_text(DEMO_VERSION)
    if not conditions_path(data, "test").is_file():  # the last file generate writes
        generate(data, train=240, test=100, seed=11, variety=True, sizes=DEMO_SIZES)
    return data


def ready_demo_bundle(folder: Path) -> Path | None:
    """The bundle under ``folder`` if one was built under this recipe."""
    bundle = folder / "bundle"
    try:
        return bundle if load_bundle(bundle).manifest.version == DEMO_VERSION else None
    except BundleError:
        return None


def train_demo_bundle(folder: Path, device: str = "cpu") -> Path:
    """Train the demo bundle on the phantoms under ``folder`` (``demo_phantoms`` made them) on
    ``device`` (as ``spinenode train --device`` takes it); a run interrupted under this recipe
    resumes."""
    data, run, bundle = folder / "phantoms", folder / "run", folder / "bundle"
    start = time.monotonic()
    config = load_config("demo")
    print("demo: training a phantom bundle (first run only, 5 to 11 minutes on 2 cores)...",
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

