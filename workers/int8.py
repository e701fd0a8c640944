"""DERNet members in int8 on a CPU: post-training static quantization with PyTorch's FX graph
mode and its x86 engine (fbgemm's int8 kernels, VNNI where the CPU has it). No other runtime:
nothing to install, nothing that reports usage anywhere.

Export calibrates each member on training images and keeps only what the activation observers
saw (histograms and ranges, no pixels) in the bundle; a worker rebuilds the same graph, loads
those statistics and converts it, so it serves exactly what export checked against float32.
The detector stays out: its boxes must stay within 0.5 px, which even float16 missed.

Each member is checked apart and served in int8 only where it passed; the rest stay float32.
Measured on a 2-core AMD EPYC at 384 px, every layer in int8: ResNet-50 4.7x, DenseNet-121 1.9x
and EfficientNetV2-S 1.3x faster than float32.
"""

from __future__ import annotations

import platform
import warnings

import torch
from torch import nn
from torch.fx import GraphModule

ENGINE = "x86"
# Left in float32: each member's first convolution and its head. On the phantom demo bundle's
# held-out images ResNet-50's int8 probabilities moved by up to 0.041 with them quantized, 0.009
# without (DenseNet-121: 0.017 and 0.012); ResNet-50 took about 14% longer at 96 px.
FLOAT_LAYERS = {"densenet121": ("features.conv0", "classifier"),
                "tf_efficientnetv2_s": ("conv_stem", "classifier"),
                "resnet50": ("conv1", "fc")}


def cpu_serves_int8() -> bool:
    """PyTorch's x86 int8 engine is there (any x86-64 build of torch has it)."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and ENGINE in torch.backends.quantized.supported_engines)


class _PaddedConv(nn.Module):
    """TensorFlow's 'same' padding as a fixed pad and a plain convolution, for one input size."""

    def __init__(self, pad: tuple[int, int, int, int], conv: nn.Conv2d):
        super().__init__()
        self.pad = nn.ZeroPad2d(pad)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


def _fix_same_padding(model: nn.Module, example: torch.Tensor) -> None:
    """timm's Conv2dSame works its padding out from each input's size, which FX cannot trace
    (EfficientNetV2-S has them): the input size is fixed here, so each gets its fixed pad."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    sizes: dict[str, torch.Size] = {}
    hooks = [module.register_forward_pre_hook(
        lambda _, args, name=name: sizes.__setitem__(name, args[0].shape[-2:]))
        for name, module in model.named_modules() if isinstance(module, Conv2dSame)]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    for name, (height, width) in sizes.items():
        same = model.get_submodule(name)
        pad_h, pad_w = (get_same_padding(size, kernel, stride, dilation) for size, kernel,
                        stride, dilation in zip((height, width), same.kernel_size, same.stride,
                                                same.dilation, strict=True))
        conv = nn.Conv2d(same.in_channels, same.out_channels, same.kernel_size, same.stride, 0,
                         same.dilation, same.groups, same.bias is not None)
        conv.load_state_dict(same.state_dict())
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, _PaddedConv(
            (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), conv))


def prepare_member(model: nn.Module, architecture: str, input_size: int) -> GraphModule:
    """The float32 member (weights loaded, eval mode) with observers on its activations, for a
    square input of ``input_size``: run calibration images through it, then ``convert``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = ENGINE
    example = torch.zeros(1, 3, input_size, input_size)
    _fix_same_padding(model, example)
    # The x86 default: int8 weights per channel, activations in 7 bits (full 8-bit activations
    # wrecked DenseNet-121's outputs here: |dp| 0.35).
    mapping = get_default_qconfig_mapping(ENGINE)
    for name in FLOAT_LAYERS[architecture]:
        mapping = mapping.set_module_name(name, None)
    with warnings.catch_warnings():
        # FX graph mode is deprecated in favour of torchao, which this project does not carry,
        # and the 7-bit activations (reduce_range) warn.
        warnings.simplefilter("ignore")
        return prepare_fx(model, mapping, (example,))


def observer_statistics(prepared: GraphModule) -> dict[str, torch.Tensor]:
    """What calibration taught the observers: the tensors a bundle keeps (no weights)."""
    return {key: value for key, value in prepared.state_dict().items()
            if "activation_post_process" in key}


def convert(prepared: GraphModule) -> GraphModule:
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in prepare_member
        return convert_fx(prepared)


def quantized_member(model: nn.Module, architecture: str, input_size: int,
                     statistics: dict[str, torch.Tensor]) -> GraphModule:
    """The int8 member a worker serves: the float32 ``model`` with the bundle's calibration."""
    prepared = prepare_member(model, architecture, input_size)
    result = prepared.load_state_dict(statistics, strict=False)
    if result.unexpected_keys or any("activation_post_process" in key
                                     for key in result.missing_keys):
        raise ValueError("int8 calibration does not fit this member's graph")
    return convert(prepared)
