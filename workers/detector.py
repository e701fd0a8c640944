"""The YOLO11 lesion detector through ultralytics, offline.

We letterbox the image ourselves and map boxes back with the same numbers, so a box comes back
in the original image's pixel coordinates exactly; ultralytics supplies the model and the NMS.
Ultralytics must be imported through ``workers.offline`` (no downloads, our font, our threads).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.analysis import FindingBox
from workers.bundle import PRECISION_TOLERANCE, Bundle, BundleError, DetectorSpec
from workers.compiled import compiled_or_eager
from workers.dernet import as_float_tensor, autocast
from workers.offline import ultralytics_modules

# Ultralytics pads with grey 114 of 255; the weights were trained on such borders.
PAD_VALUE = 114 / 255


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed in the square detector input: x_in = x * scale_x + pad_x."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    width: int  # of the original image
    height: int

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) x0, y0, x1, y1 in the detector input -> original pixels, clipped to the image."""
        out = np.empty_like(boxes, dtype=np.float64)
        out[:, [0, 2]] = (boxes[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (boxes[:, [1, 3]] - self.pad_y) / self.scale_y
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.height)
        return out

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        out = np.empty_like(boxes, dtype=np.float64)
        out[:, [0, 2]] = boxes[:, [0, 2]] * self.scale_x + self.pad_x
        out[:, [1, 3]] = boxes[:, [1, 3]] * self.scale_y + self.pad_y
        return out


def letterbox(pixels: np.ndarray | torch.Tensor, size: int) -> tuple[torch.Tensor, Letterbox]:
    """[0, 1] grey (H, W) -> (3, size, size) with the image scaled to fit and centred, on the
    image's device (a tensor's; the CPU for an array)."""
    height, width = pixels.shape
    scale = min(size / height, size / width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    image = as_float_tensor(pixels)[None, None]
    resized = F.interpolate(image, size=(new_h, new_w), mode="bilinear", antialias=True,
                            align_corners=False)[0, 0]
    canvas = torch.full((size, size), PAD_VALUE, dtype=torch.float32, device=image.device)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized.clamp(0, 1)
    # Per axis, after rounding the resized size: the exact inverse of what was done.
    geometry = Letterbox(scale_x=new_w / width, scale_y=new_h / height, pad_x=pad_x,
                         pad_y=pad_y, width=width, height=height)
    return canvas.expand(3, size, size), geometry


def bundled_detection_model(bundle: Bundle) -> torch.nn.Module:
    """The bundle's detector: ultralytics' own YOLO11 layout at the manifest's scale and class
    count, fused, with the bundle's weights. The file is a state dict of plain tensors read
    with weights_only=True, so a bundle cannot make the loader run code; nothing but tensors
    comes from it (the layout is the package's)."""
    spec = bundle.manifest.detector
    model = _yolo11(spec.scale, len(spec.class_names), spec.class_branch_width)
    model.fuse(verbose=False)
    try:
        state = torch.load(bundle.verified_bytes(spec.weights), map_location="cpu",
                           weights_only=True)
        model.load_state_dict(state)
    except (pickle.UnpicklingError, RuntimeError) as error:  # not tensors / not this layout
        raise BundleError(f"bundle {bundle.path}: {spec.weights} is not the state dict of a "
                          f"yolo11{spec.scale} detector with {len(spec.class_names)} classes: "
                          f"{str(error).splitlines()[0]}") from None
    return model.float().eval()


def _yolo11(scale: str, classes: int, width: int | None) -> torch.nn.Module:
    """Ultralytics' YOLO11 of this scale for ``classes`` classes. The head's class branch is
    as wide as its class count asks (at least its input's width) unless training started from
    weights for more classes: ultralytics then keeps the start's ``width``, which the manifest
    records, and the branch is built that wide here (as the head builds it for that count)."""
    ultralytics = ultralytics_modules()
    model = ultralytics.DetectionModel(f"yolo11{scale}.yaml", nc=classes, verbose=False)
    head = model.model[-1]
    if width and width != class_branch_width(model):
        # A head alone for ``width`` classes on the same inputs, initialised as a model's
        # build does, not a second whole model (a widened YOLO11-l: 1.01 -> 0.45 s to build).
        inputs = [branch[0].conv.in_channels for branch in head.cv2]
        wide = type(head)(nc=width, reg_max=head.reg_max, end2end=head.end2end, ch=inputs)
        ultralytics.initialize_weights(wide)
        for branch in wide.cv3:
            branch[-1] = torch.nn.Conv2d(width, classes, 1)
        head.cv3 = wide.cv3
    return model


def class_branch_width(model: torch.nn.Module) -> int:
    """The width of a detection model's class branch (see _yolo11)."""
    return model.model[-1].cv3[0][-1].in_channels


def load_detection_model(weights: str | io.BytesIO) -> torch.nn.Module:
    """An ultralytics checkpoint that training wrote itself -> its DetectionModel, fused,
    float32. A checkpoint is a pickle of the model's classes (weights_only cannot read it):
    only for files of one's own run, never for a bundle (see bundled_detection_model)."""
    ultralytics = ultralytics_modules()
    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    model = (checkpoint.get("ema") or checkpoint["model"]).float()
    if not isinstance(model, ultralytics.DetectionModel):
        raise ValueError(f"{weights} does not hold an ultralytics DetectionModel")
    return model.fuse(verbose=False).eval()


def prediction_differences(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Two detectors' raw predictions (B, 4 + classes, anchors): the largest difference of the
    box centres and sizes in pixels, and of the class scores."""
    return {"box_px": float((reference[:, :4] - other[:, :4]).abs().max()),
            "score": float((reference[:, 4:] - other[:, 4:]).abs().max())}


def predictions_agree(eager: torch.Tensor, compiled: torch.Tensor) -> str | None:
    """The detector compiled against eager (workers/compiled.py)."""
    differences = prediction_differences(eager, compiled)
    if all(value <= PRECISION_TOLERANCE[key] for key, value in differences.items()):
        return None
    return (f"its boxes differ by {differences['box_px']:.3f} px and its scores by "
            f"{differences['score']:.4f}")


class Detector:
    def __init__(self, bundle: Bundle, device: torch.device,
                 dtype: torch.dtype = torch.float32, weights: Path | None = None):
        """``weights``: a checkpoint of training's own run instead of the bundle's detector
        (training's ablations)."""
        self.spec: DetectorSpec = bundle.manifest.detector
        self.device = device
        self.dtype = dtype
        model = (load_detection_model(str(weights)) if weights
                 else bundled_detection_model(bundle))
        self.model = model.to(device, memory_format=torch.channels_last)
        classes = self.model.model[-1].nc
        if classes != len(self.spec.class_names):
            raise ValueError(f"detector has {classes} classes, manifest names "
                             f"{len(self.spec.class_names)}")

    def compile(self) -> None:
        """The model compiled for one image where it agrees with itself eager
        (workers/compiled.py)."""
        size = self.spec.image_size
        example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        example = example.to(self.device).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.dtype):
            self.model = compiled_or_eager(self.model, example, predictions_agree, "detector")

    @torch.inference_mode()
    def raw_predictions(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) letterboxed -> (B, 4 + classes, anchors) before NMS, as float32."""
        raw = self.model(batch.contiguous(memory_format=torch.channels_last))
        return (raw[0] if isinstance(raw, (list, tuple)) else raw).float()

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray] | list[torch.Tensor],
               confidence: float | None = None) -> list[list[FindingBox]]:
        """Boxes per image; ``confidence`` overrides the bundle's (an evaluation's mAP wants
        the whole precision-recall curve)."""
        placed = [letterbox(image, self.spec.image_size) for image in images]
        batch = torch.stack([tensor for tensor, _ in placed]).to(self.device)
        with autocast(self.device, self.dtype):
            prediction = self.raw_predictions(batch)
        kept = ultralytics_modules().non_max_suppression(
            prediction,
            conf_thres=self.spec.confidence if confidence is None else confidence,
            iou_thres=self.spec.nms_iou, max_det=300,
        )
        results = []
        for (_, geometry), found in zip(placed, kept, strict=True):
            found = found.cpu().numpy()
            boxes = geometry.to_original(found[:, :4])
            results.append([
                FindingBox(self.spec.class_names[int(cls)], float(score), *map(float, box),
                           class_index=int(cls))
                for box, score, cls in zip(boxes, found[:, 4], found[:, 5], strict=True)
            ])
        return results
