"""Training the phantom bundle of ``spinenode demo`` (``training.demo_data`` makes the phantoms
and finds a bundle already built under the same recipe)."""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from training.classify import TrainingStopped, cross_validate, fit_ensemble
from training.config import DetectConfig, TrainingConfig, load_config, torch_device
from training.demo_data import DEMO_VERSION
from training.detect import train_detector
from training.export import export_bundle
from training.prepare import prepare

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event


def train_demo_bundle(folder: Path, device: str = "cpu") -> Path:
    """Train the demo bundle on the phantoms under ``folder`` (``demo_phantoms`` made them) on
    ``device`` (as ``spinenode train --device`` takes it); a run interrupted under this recipe
    resumes."""
    data, run, bundle = folder / "phantoms", folder / "run", folder / "bundle"
    start = time.monotonic()
    config = load_config("demo")
    print("demo: training a phantom bundle (first run only: about 7 minutes on 2 cores)...",
          flush=True)

    def done(step: str) -> None:
        print(f"demo: {step} ({time.monotonic() - start:.0f} s)", flush=True)

    prepare(data, run, config)
    done("phantoms prepared")
    train_side_by_side(run, config, device, done)
    export_bundle(run, config, bundle, "spinenode-phantom-demo", DEMO_VERSION)
    print(f"demo: bundle ready in {time.monotonic() - start:.0f} s: {bundle}", flush=True)
    return bundle


def train_side_by_side(run: Path, config: TrainingConfig, device: str,
                       done: Callable[[str], None]) -> None:
    """DERNet (cross-validation, ensemble) here and YOLO11 in a second process, at once, each
    on half of this process's threads (2-core AMD EPYC without AVX-512, the demo's recipe
    before 0.4.0: 273 s + 328 s one after the other on two threads each, 474 s at once on one
    each); the one that finishes first leaves its threads to the other, at the other's next
    batch. A detector that fails stops DERNet at its next batch (a fold finished so far
    resumes on the next run)."""
    threads = torch.get_num_threads()  # torch's count: the cores it may use, not hyperthreads
    share = max(1, threads // 2)
    context = multiprocessing.get_context("spawn")
    dernet_done = context.Event()
    detector = context.Process(target=_train_detector, name="yolo11-training",
                               args=(run, config.detect, device, share, threads, dernet_done))
    detector.start()
    torch.set_num_threads(share)
    detector_finished = False

    def stop_or_take_the_detectors_threads() -> bool:
        """Asked before each DERNet batch: whether to stop (the detector failed); a detector
        that finished leaves its threads. Only this thread looks at the process (its exit
        status is collected once)."""
        nonlocal detector_finished
        if detector.exitcode is None or detector_finished:
            return False
        if detector.exitcode != 0:
            return True
        detector_finished = True
        if threads > share:
            torch.set_num_threads(threads)
            done(f"YOLO11 trained; DERNet goes on on {threads} threads")
        else:
            done("YOLO11 trained")
        return False

    try:
        cross_validate(run, config, torch_device(device), fold_bars=False,
                       stop=stop_or_take_the_detectors_threads)
        fit_ensemble(run, config)
        done("DERNet members trained, ensemble fitted")
        dernet_done.set()
        detector.join()
    except TrainingStopped:
        pass  # the detector's failure is reported below
    finally:
        torch.set_num_threads(threads)
        if detector.is_alive():  # DERNet failed or was interrupted: the detector goes too
            detector.terminate()
            detector.join()
    if detector.exitcode != 0:
        raise RuntimeError(f"YOLO11 training failed (exit code {detector.exitcode}); its "
                           f"output is above, its run in {run / 'detect'}")
    if not detector_finished:
        done("YOLO11 trained")


def _train_detector(run: Path, detect: DetectConfig, device: str, share: int, threads: int,
                    dernet_done: Event) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # its epoch lines as they come, into a pipe too

    took_dernets = False

    def use_its_threads(_trainer: object) -> None:
        # ultralytics sets a thread count of its own (the CPUs less one) each time it picks
        # a device, so this is said again at each batch and each validation.
        nonlocal took_dernets
        if dernet_done.is_set() and threads > share and not took_dernets:
            took_dernets = True
            print(f"demo: DERNet done; YOLO11 goes on on {threads} threads", flush=True)
        torch.set_num_threads(threads if took_dernets else share)
    use_its_threads(None)  # before ultralytics is imported, too
    train_detector(run, detect, device=device, callbacks=dict.fromkeys(
        ("on_train_start", "on_train_batch_start", "on_val_start"), use_its_threads))
