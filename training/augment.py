"""The paper's classification augmentations, on a (1, H, W) [0, 1] grey tensor."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF


def augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """hflip 0.5, rotation +-15 deg, brightness and contrast +-0.2, Gaussian blur k=5 with
    sigma 0.1-2.0 (half the time)."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    if uniform(0, 1) < 0.5:
        image = torch.flip(image, dims=[-1])
    image = TF.rotate(image, uniform(-15, 15), interpolation=TF.InterpolationMode.BILINEAR)
    image = TF.adjust_brightness(image, uniform(0.8, 1.2))
    image = TF.adjust_contrast(image, uniform(0.8, 1.2))
    if uniform(0, 1) < 0.5:
        sigma = uniform(0.1, 2.0)
        image = TF.gaussian_blur(image, kernel_size=[5, 5], sigma=[sigma, sigma])
    return image.clamp(0, 1)
