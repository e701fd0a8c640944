"""Ultralytics, fully offline: no download of any kind, our font, our thread count.

Ultralytics reads its settings at import: so set the environment first, with a config dir that
already holds the font it would otherwise fetch (its font check ignores YOLO_OFFLINE).
"""

from __future__ import annotations

import os
import shutil
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import matplotlib

_config_dir: Path | None = None


def prepare_offline(config_dir: Path) -> None:
    """Call before ultralytics is first imported in this process."""
    global _config_dir
    config_dir.mkdir(parents=True, exist_ok=True)
    font = config_dir / "Arial.ttf"
    if not font.exists():
        shipped = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        shutil.copyfile(shipped, font)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir.resolve())
    os.environ.setdefault("YOLO_VERBOSE", "False")
    _config_dir = config_dir


@cache
def ultralytics_modules() -> SimpleNamespace:
    if _config_dir is None:
        raise RuntimeError("call workers.offline.prepare_offline(config_dir) first")
    import torch

    threads = torch.get_num_threads()
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import torch_utils
    from ultralytics.utils.nms import non_max_suppression

    # Importing ultralytics may lower torch's threads (it sets OMP_NUM_THREADS=1): restore them.
    torch.set_num_threads(threads)
    torch_utils.NUM_THREADS = threads
    return SimpleNamespace(DetectionModel=DetectionModel,
                           initialize_weights=torch_utils.initialize_weights,
                           non_max_suppression=non_max_suppression)
