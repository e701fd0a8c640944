"""DERNet members in int8 on an x86-64 CPU: post-training static quantization in PyTorch's
export (PT2E) form, with torchao's x86 quantizer, compiled by inductor into oneDNN's int8
kernels (VNNI or AMX where the CPU has them). Nothing to install beyond torchao, nothing that
reports usage anywhere.

Export calibrates each member on training images and keeps only what the activation observers
saw (ranges, no pixels) in the bundle; a worker exports the same graph, loads those statistics,
converts and compiles it, so it serves what export checked against float32 (export checks the
compiled member, as served). At load the compiled member is checked against float32 once more,
on the runtime's fixed example (this CPU's kernels may differ from export's). The detector
stays out: its boxes must stay within 0.5 px, which even float16 missed.

Only compiled is int8 fast: uncompiled, a quantized graph emulates int8 in float32 and is
slower than float32 itself. So int8 needs a C++ compiler, as ``compile_models`` does; where
compiling fails, the member is served as the float members are (DERNet's ``rest``) and the log
says why.

Measured on a 2-core AMD EPYC with avx512_bf16 (benchmarks/int8_members.py, 5 views at 384 px,
same machine and hour): DenseNet-121 0.222 s, EfficientNetV2-S 0.211 s, ResNet-50 0.196 s; the
same members took 0.337/0.407/0.205 s with PyTorch's earlier FX int8 (fbgemm's kernels, not
compiled), 0.258/0.287/0.308 s compiled in bfloat16 and 0.647/0.653/0.835 s in float32.
"""

from __future__ import annotations

import logging
import platform
import shutil
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from workers.compiled import Agreement, compiled_or_eager

log = logging.getLogger(__name__)
_CONVERTING = threading.Lock()

# Left in float32: each member's first convolution and its head. On the phantom demo bundle's
# held-out images ResNet-50's int8 probabilities moved by up to 0.041 with them quantized, 0.009
# without (DenseNet-121: 0.017 and 0.012; measured with the earlier FX int8).
FLOAT_LAYERS = {"densenet121": ("features.conv0", "classifier"),
                "tf_efficientnetv2_s": ("conv_stem", "classifier"),
                "resnet50": ("conv1", "fc")}


def cpu_serves_int8() -> bool:
    """An x86-64 CPU and a C++ compiler for inductor to build the int8 kernels with."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and shutil.which("g++") is not None)


def x86_quantizer(float_layers: tuple[str, ...] = ()):
    """torchao's x86 quantizer as members get it: every layer in int8 but ``float_layers``."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    for name in float_layers:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def prepare_member(model: nn.Module, architecture: str, input_size: int) -> torch.fx.GraphModule:
    """The float32 member (weights loaded, eval mode) exported for square inputs of
    ``input_size`` (any batch) with observers on its activations: run calibration images
    through it, then ``quantized_member`` or ``observer_statistics``."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    # Batch 2, not 1: export would take a dimension of size 1 for a constant.
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's notes on its own deprecations
        exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        return prepare_pt2e(exported.module(), x86_quantizer(FLOAT_LAYERS[architecture]))


def observer_statistics(prepared: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """What calibration taught the observers: the tensors a bundle keeps (no weights)."""
    return {key: value for key, value in prepared.state_dict().items()
            if "activation_post_process" in key}


def quantized_member(model: nn.Module, architecture: str, input_size: int,
                     statistics: dict[str, torch.Tensor], example: torch.Tensor,
                     agree: Agreement) -> nn.Module:
    """The int8 member a worker serves: the float32 ``model`` with the bundle's calibration,
    compiled for inputs shaped like ``example`` (one image's views). The float32 ``model``
    where it could not be compiled, or compiled is not within ``agree`` of it on ``example``."""
    converted = calibrated_member(model, architecture, input_size, statistics)
    # Checked against the float32 member, as export checked it: the uncompiled graph only
    # emulates int8, and is no closer to float32 than the compiled one (a trained
    # EfficientNetV2-S: compiled 0.0056 from float32 on the example, emulated 0.0117, the two
    # 0.0103 apart).
    compiled = compiled_or_eager(converted, example, agree, f"{architecture} (int8)",
                                 reference=model)
    if compiled is converted:
        log.warning("%s: not in int8 (int8 only compiled, and close to float32)",
                    architecture)
        return model
    return compiled


def calibrated_member(model: nn.Module, architecture: str, input_size: int,
                      statistics: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """The float32 ``model`` in int8 (uncompiled: emulated) with the calibration export kept:
    its graph exported again, the observers' statistics loaded into it, converted."""
    prepared = prepare_member(model, architecture, input_size)
    result = prepared.load_state_dict(statistics, strict=False)
    if result.unexpected_keys or any("activation_post_process" in key
                                     for key in result.missing_keys):
        raise ValueError("int8 calibration does not fit this member's graph")
    return convert_member(prepared)


def convert_member(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The calibrated member in int8 (quantize and dequantize around each quantized operation,
    weights quantized): torchao's ``convert_pt2e``, less a step that does nothing here."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with warnings.catch_warnings(), _without_the_qat_fold():
        warnings.simplefilter("ignore")
        return convert_pt2e(prepared)


@contextmanager
def _without_the_qat_fold() -> Iterator[None]:
    # convert_pt2e folds the convolution-BatchNorm patterns that quantization-aware training
    # leaves. A post-training prepare (ours) folds each BatchNorm into its convolution first,
    # so there are none; but wherever a graph keeps a BatchNorm (DenseNet-121's before each
    # convolution) the fold first traces every pattern it looks for: 20.4 s of converting
    # DenseNet-121 on a 2-core AMD EPYC, 1.1 s without, the graph the same (a test keeps
    # that). Where torchao moves the step, convert_pt2e runs as it is.
    # One conversion at a time: two threads' swaps interleaved could leave the step out for good.
    from torchao.quantization.pt2e import quantize_pt2e

    with _CONVERTING:
        fold = getattr(quantize_pt2e, "_fold_conv_bn_qat", None)
        if fold is None:
            yield
            return
        quantize_pt2e._fold_conv_bn_qat = lambda model: model
        try:
            yield
        finally:
            quantize_pt2e._fold_conv_bn_qat = fold
