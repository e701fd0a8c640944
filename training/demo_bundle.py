"""Training the phantom bundle of ``spinenode demo`` (``training.demo_data`` makes the phantoms
and finds a bundle already built under the same recipe)."""

from __future__ import annotations

import _thread
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from training.classify import cross_validate, fit_ensemble
from training.config import DetectConfig, TrainingConfig, load_config, torch_device
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
    on half the cores (2-core AMD EPYC without AVX-512, the demo's recipe before 0.4.0: 273 s
    + 328 s one after the other on two threads each, 474 s at once on one each). A detector
    that fails stops DERNet's training at once: the demo says so then, not minutes later."""
    share = max(1, (os.cpu_count() or 2) // 2)
    detector = multiprocessing.get_context("spawn").Process(
        target=_train_detector, args=(run, config.detect, device, share), name="yolo11-training")
    detector.start()
    failed = threading.Event()
    watch = threading.Thread(target=_interrupt_if_failed, args=(detector, failed),
                             name="yolo11-watch", daemon=True)
    watch.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(share)
    try:
        cross_validate(run, config, torch_device(device), fold_bars=False)
        fit_ensemble(run, config)
        done("DERNet members trained, ensemble fitted")
        watch.join()  # the detector's end, and its interrupt if it failed, land in this try
    except KeyboardInterrupt:
        if not failed.is_set():
            raise  # Ctrl-C (the detector ignores it: it is stopped below)
    finally:
        torch.set_num_threads(threads)
        if detector.is_alive():  # DERNet failed or was interrupted: the detector goes too
            detector.terminate()
            detector.join()
    if detector.exitcode != 0:
        raise RuntimeError(f"YOLO11 training failed (exit code {detector.exitcode}); its "
                           f"output is above, its run in {run / 'detect'}")
    done("YOLO11 trained")


def _interrupt_if_failed(detector: multiprocessing.process.BaseProcess,
                         failed: threading.Event) -> None:
    """Interrupt DERNet's training (in the main thread) where the detector exits with an error;
    not where it succeeded or was stopped (a signal: a negative exit code)."""
    detector.join()
    if detector.exitcode is not None and detector.exitcode > 0:
        failed.set()
        _thread.interrupt_main()


def _train_detector(run: Path, detect: DetectConfig, device: str, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    torch.set_num_threads(threads)  # before ultralytics is imported: it trains on as many
    sys.stdout.reconfigure(line_buffering=True)  # its epoch lines as they come, into a pipe too
    train_detector(run, detect, device=device)
