"""The demo's data, without torch: its phantoms and, once trained, its bundle (in one folder,
made under one recipe). ``spinenode demo`` makes the phantoms and sends some while the packages
that train (``training.demo_bundle``) are still being installed."""

from __future__ import annotations

import shutil
from pathlib import Path

from training.phantoms import conditions_path, generate
from workers.bundle import BundleError, load_bundle

# Varied phantoms (three difficulty bands, 4-7 levels, both photometrics), their long side from
# 300 to 1,500 px: the generator goes to 3,000, which doubles the demo's data for no new look.
DEMO_SIZES = (300, 1500)
DEMO_VERSION = "0.4.0"  # change it with the phantoms or training/configs/demo.yaml


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
