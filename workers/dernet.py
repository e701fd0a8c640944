"""DERNet: the classification ensemble (DenseNet-121, EfficientNetV2-S, ResNet-50 via timm).

Each member sees the same preprocessed image under every test-time augmentation the bundle
lists; a member's probability is the mean over those views, and the ensemble's is the weighted
mean of the members' (weights from the bundle), compared with the bundle's threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from dicom_node.analysis import Classification
from workers.bundle import PRECISION_TOLERANCE, Bundle, BundleError, ClassifierSpec
from workers.compiled import compiled_or_eager
from workers.int8 import quantized_member

T = TypeVar("T")


def classifier_input(pixels: np.ndarray | torch.Tensor, spec: ClassifierSpec) -> torch.Tensor:
    """[0, 1] grey image (H, W) -> normalised (3, S, S) tensor, S = the bundle's input size, on
    the image's device (a tensor's; the CPU for an array).

    The one preprocessing for the classifiers: through the training cache's view
    (``cached_view``) where the bundle names its size, then ``resize_and_normalise``, which
    training applies to its cached images too.
    """
    if spec.source_size is not None:
        pixels = cached_view(pixels, spec.source_size)
    return resize_and_normalise(pixels, spec.input_size, spec.mean, spec.std)


def as_float_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float32 on the tensor's device, or a CPU tensor over the array (no copy where it is
    float32 and contiguous)."""
    if isinstance(pixels, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    return pixels.float()


def cached_view(pixels: np.ndarray | torch.Tensor, long_side: int) -> np.ndarray | torch.Tensor:
    """The [0, 1] image as training's cache holds it: at most LONG_SIDE pixels on its longer
    side (antialiased bilinear, in float32) and stored as float16 (the cache's half-size files).
    An array for an array (what the cache stores), a tensor on its device for a tensor."""
    image = as_float_tensor(pixels)
    scale = long_side / max(image.shape)
    if scale < 1:
        size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
        image = F.interpolate(image[None, None], size=size, mode="bilinear", antialias=True,
                              align_corners=False)[0, 0]
    view = image.to(torch.float16)
    return view.numpy() if isinstance(pixels, np.ndarray) else view


def resize_and_normalise(pixels: np.ndarray | torch.Tensor, size: int,
                         mean: tuple[float, float, float],
                         std: tuple[float, float, float]) -> torch.Tensor:
    image = as_float_tensor(pixels).reshape(1, 1, *pixels.shape[-2:])
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)[0]
    image = image.clamp(0, 1).expand(3, size, size)
    return (image - image.new_tensor(mean).view(3, 1, 1)) / image.new_tensor(std).view(3, 1, 1)


def _zoom(batch: torch.Tensor, factor: float) -> torch.Tensor:
    size = batch.shape[-1]
    crop = round(size / factor)
    cropped = TF.center_crop(batch, [crop, crop])
    return F.interpolate(cropped, size=(size, size), mode="bilinear", align_corners=False)


TTA = {
    "identity": lambda batch: batch,
    "hflip": lambda batch: torch.flip(batch, dims=[-1]),
    "rotate+10": lambda batch: TF.rotate(batch, 10.0, interpolation=TF.InterpolationMode.BILINEAR),
    "rotate-10": lambda batch: TF.rotate(batch, -10.0,
                                         interpolation=TF.InterpolationMode.BILINEAR),
    "zoom1.1": lambda batch: _zoom(batch, 1.1),
}


def tta_views(batch: torch.Tensor, names: list[str]) -> torch.Tensor:
    """(B, 3, S, S) -> (B * T, 3, S, S), the views of each image next to each other."""
    views = torch.stack([TTA[name](batch) for name in names], dim=1)
    return views.reshape(-1, *batch.shape[1:])


def build_member(architecture: str) -> torch.nn.Module:
    return timm.create_model(architecture, pretrained=False, num_classes=1)


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Reduced-precision compute where asked (bfloat16 on CPU, float16 on CUDA); int8 members
    are quantized graphs, not autocast."""
    return torch.autocast(device_type=device.type, dtype=dtype,
                          enabled=dtype in (torch.bfloat16, torch.float16))


def ensemble_mean(per_member: Mapping[str, T], weights: Mapping[str, float]) -> T:
    """DERNet's ensemble: the members' probabilities (numbers or arrays) averaged with their
    ensemble weights."""
    total = sum(weights[name] * value for name, value in per_member.items())
    return total / sum(weights[name] for name in per_member)


def probabilities_agree(eager: torch.Tensor, compiled: torch.Tensor) -> str | None:
    """A member's logits compiled against eager (workers/compiled.py)."""
    deviation = (torch.sigmoid(eager) - torch.sigmoid(compiled)).abs().max().item()
    return (None if deviation <= PRECISION_TOLERANCE["probability"]
            else f"its probabilities differ by {deviation:.4f}")


class DERNet:
    def __init__(self, bundle: Bundle, device: torch.device,
                 dtype: torch.dtype = torch.float32, rest: torch.dtype = torch.float32):
        """``dtype`` int8: the members the bundle calibrated in int8, the rest in ``rest``
        (bfloat16 where the bundle validated it and the CPU has it natively)."""
        self.spec = bundle.manifest.classifier
        self.device = device
        self.dtype = dtype
        self.members: list[tuple[str, float, torch.nn.Module]] = []
        # int8: the members export checked and calibrated (workers/int8.py), by architecture.
        calibration: dict[str, dict[str, torch.Tensor]] = {}
        if dtype == torch.qint8:
            if not self.spec.int8_calibration:
                raise BundleError(f"bundle {bundle.label} has no int8 calibration")
            calibration = torch.load(bundle.verified_bytes(self.spec.int8_calibration),
                                     weights_only=True)
        self.int8_members: list[str] = []
        example = self._example() if calibration else None  # what int8 members compile for
        for member in self.spec.members:
            model = build_member(member.architecture)
            state = torch.load(bundle.verified_bytes(member.weights), map_location="cpu",
                               weights_only=True)
            model.load_state_dict(state)
            model.eval()
            # channels_last: oneDNN's fast convolution layout on CPU, tensor cores on GPU.
            model.to(device, memory_format=torch.channels_last)
            if member.architecture in calibration:  # else this member runs in ``rest``
                int8 = quantized_member(model, member.architecture, self.spec.input_size,
                                        calibration[member.architecture], example,
                                        probabilities_agree)
                if int8 is not model:
                    self.int8_members.append(member.architecture)
                model = int8
            self.members.append((member.architecture, member.ensemble_weight, model))
        self.int8_members.sort()
        # What each member computes in: autocast for the float ones, none for int8 graphs.
        self.member_dtypes = {
            name: (torch.qint8 if name in self.int8_members
                   else rest if dtype == torch.qint8 else dtype)
            for name, _, _ in self.members}

    def _example(self) -> torch.Tensor:
        """What models are compiled for and checked on: one image's views, as served, of a
        smooth synthetic picture. Not noise: int8 members are calibrated on radiographs, and
        noise leaves their ranges (a random-weight int8 EfficientNetV2-S then differed from
        itself uncompiled by 0.86 in probability)."""
        coarse = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        picture = F.interpolate(coarse, size=(256, 256), mode="bilinear", align_corners=False)
        views = tta_views(self.inputs([picture[0, 0].numpy()]), self.spec.tta)
        return views.to(self.device).contiguous(memory_format=torch.channels_last)

    def compile(self) -> None:
        """Each float member compiled for one image's views where it agrees with itself eager
        (workers/compiled.py); int8 members are compiled already."""
        example = self._example()
        compiled = []
        for name, weight, model in self.members:
            if name not in self.int8_members:
                with autocast(self.device, self.member_dtypes[name]):
                    model = compiled_or_eager(model, example, probabilities_agree, name)
            compiled.append((name, weight, model))
        self.members = compiled

    @torch.inference_mode()
    def view_probabilities(self, inputs: torch.Tensor,
                           only: str | None = None) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) preprocessed images -> architecture -> (B, T) probability per TTA view,
        in the manifest's order; of every member, or ``only`` that one."""
        views = tta_views(inputs.to(self.device), self.spec.tta)
        views = views.contiguous(memory_format=torch.channels_last)
        count = len(self.spec.tta)
        probabilities = {}
        for name, _, model in self.members:
            if only in (None, name):
                with autocast(self.device, self.member_dtypes[name]):
                    logits = model(views)
                probabilities[name] = torch.sigmoid(logits.float().view(-1, count)).cpu()
        return probabilities

    def inputs(self, images: list[np.ndarray] | list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([classifier_input(image, self.spec) for image in images])

    def classify(self, images: list[np.ndarray] | list[torch.Tensor]) -> list[Classification]:
        per_view = self.view_probabilities(self.inputs(images))
        per_member = {name: views.mean(dim=1) for name, views in per_view.items()}
        weights = {name: weight for name, weight, _ in self.members}
        results = []
        for index in range(len(images)):
            members = {name: float(probs[index]) for name, probs in per_member.items()}
            probability = ensemble_mean(members, weights)
            views = {name: tuple(map(float, probs[index])) for name, probs in per_view.items()}
            results.append(Classification(members, views, probability, self.spec.threshold,
                                          probability >= self.spec.threshold))
        return results
