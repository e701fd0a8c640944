"""What the paper run (training/configs/paper.yaml on VinDr-SpineXR) costs, before starting it.

    .venv/bin/python benchmarks/training_cost.py [--steps 2] [--sustained-tflops 200]

Measures one training step (forward, backward, optimiser) of each DERNet member at its paper
size and of YOLO11-l at 640 px on this CPU, counts the step's FLOPs with torch's FlopCounterMode,
and multiplies by the images the paper run trains on (5 folds x 60 epochs of 4/5 of 8,389 images
per member, EfficientNetV2-S at its progressive sizes; 35 epochs of 9/10 of them for the
detector; validation passes at a third of a training step's FLOPs). Prints the hours on this
CPU (from the measured step times) and on one GPU at a stated sustained throughput (FLOPs alone:
a data loader that cannot keep up makes it longer; the CPU figure is the measured one).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from training.config import load_config  # noqa: E402
from workers.dernet import build_member  # noqa: E402

TRAIN_IMAGES = 8389  # VinDr-SpineXR's training split


def step_cost(model: torch.nn.Module, inputs: torch.Tensor, loss_of, steps: int  # noqa: ANN001
              ) -> tuple[float, float]:
    """(FLOPs of one training step, measured seconds of one step) for a batch INPUTS."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad()
        loss_of(model(inputs)).backward()
        optimizer.step()

    # Forward FLOPs x 3 for the step (backward about twice the forward): torch's counter
    # overcounts the backward of grouped convolutions (EfficientNet's depthwise ones ~5x).
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(inputs)
    step()  # warm-up
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return 3.0 * float(counter.get_total_flops()), min(seconds)


def _tensors(value: object) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output: ultralytics' training outputs vary by version."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model (best kept)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sustained-tflops", type=float, default=200.0,
                        help="the GPU's sustained training throughput to assume (TFLOP/s)")
    args = parser.parse_args()
    config = load_config("paper")
    classify, detect = config.classify, config.detect
    folds = config.data.folds
    fold_train = TRAIN_IMAGES * (folds - 1) / folds
    print(f"CPU: {cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<22} {'px':>4} {'GFLOP/img':>10} {'s/img CPU':>10} {'images':>12} "
          f"{'PFLOP':>8} {'CPU h':>8} {'GPU h':>7}")
    total_flops = total_cpu = 0.0
    rows = []
    for architecture in classify.members:
        sizes = (classify.progressive_sizes if architecture == "tf_efficientnetv2_s"
                 else [classify.input_size])
        for size in sizes:
            model = build_member(architecture)
            inputs = torch.rand(args.batch, 3, size, size)
            flops, seconds = step_cost(model, inputs, lambda out: out.float().mean(), args.steps)
            # Each size takes an equal share of the epochs; validation (forward only, about a
            # third of a step) on the held-out fold every epoch.
            epochs = classify.epochs / len(sizes)
            images = folds * epochs * (fold_train + (TRAIN_IMAGES - fold_train) / 3)
            rows.append((architecture, size, flops / args.batch, seconds / args.batch, images))
    from ultralytics.nn.tasks import DetectionModel

    detector = DetectionModel(f"yolo11{detect.scale}.yaml", nc=7, verbose=False)
    inputs = torch.rand(args.batch, 3, detect.image_size, detect.image_size)
    flops, seconds = step_cost(detector, inputs,
                               lambda out: sum(t.float().mean() for t in _tensors(out)),
                               args.steps)
    detector_images = detect.epochs * TRAIN_IMAGES * (1 - config.data.val_fraction * 2 / 3)
    rows.append((f"yolo11{detect.scale}", detect.image_size, flops / args.batch,
                 seconds / args.batch, detector_images))
    for name, size, flops, seconds, images in rows:
        run_flops, cpu_hours = flops * images, seconds * images / 3600
        gpu_hours = run_flops / (args.sustained_tflops * 1e12) / 3600
        total_flops += run_flops
        total_cpu += cpu_hours
        print(f"{name:<22} {size:>4} {flops / 1e9:>10.1f} {seconds:>10.2f} {images:>12,.0f} "
              f"{run_flops / 1e15:>8.1f} {cpu_hours:>8.0f} {gpu_hours:>7.2f}")
    gpu_hours = total_flops / (args.sustained_tflops * 1e12) / 3600
    # The loader: each training image is read from the cache, augmented and resized on a CPU
    # core; a GPU that computes faster than the loader workers feed it waits for them.
    from training.augment import augment
    from workers.bundle import IMAGENET_MEAN, IMAGENET_STD
    from workers.dernet import resize_and_normalise

    cached = torch.rand(1, config.data.cache_size, round(config.data.cache_size * 0.8))
    start = time.perf_counter()
    for k in range(20):
        resize_and_normalise(augment(cached, torch.Generator().manual_seed(k)),
                             classify.input_size, IMAGENET_MEAN, IMAGENET_STD)
    per_image = (time.perf_counter() - start) / 20
    loaded = sum(images for *_, images in rows[:-1])  # the members' loader (ultralytics' own
    loader_hours = loaded * per_image / classify.loader_workers / 3600  # is not timed here)
    print(f"loader: {per_image * 1000:.0f} ms per image per core here; the members' "
          f"{loaded / 1e6:.1f}M images over {classify.loader_workers} loader workers of such "
          f"cores: {loader_hours:.1f} h")
    print(f"paper run: {total_flops / 1e15:.0f} PFLOP; {total_cpu:,.0f} h on this CPU; "
          f"{gpu_hours:.1f} h of compute on one GPU at {args.sustained_tflops:g} TFLOP/s "
          f"sustained")


if __name__ == "__main__":
    main()
