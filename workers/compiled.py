"""Models compiled by PyTorch's inductor for this CPU (opt-in: ``compile_models``).

Full size on a 2-core AMD EPYC with avx512_bf16 (benchmarks/inference.py): bfloat16 0.80 ->
0.69 s an image, preprocessing included, after 113 s of compiling; float32 1.42 -> 1.37 s.
Inductor writes C++ and builds it with the machine's compiler, so a worker that compiles
needs g++ and the Python headers; its builds are kept in the data dir
(``TORCHINDUCTOR_CACHE_DIR``): the next start of ResNet-50 and YOLO11-l took 21 s instead
of 35 s (tracing and freezing are done again each time).

A compiled model is used only where it agrees with the eager model it came from, checked on
this machine when it is compiled (on a fixed synthetic input, in the precision it will run in)
with the tolerances export checks a precision with; where it does not, or compiling fails (no
compiler), the eager model serves and the log says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# (eager, compiled) -> why they disagree, or None: the model's own module knows its outputs.
Agreement = Callable[[torch.Tensor, torch.Tensor], str | None]


def _first(output: torch.Tensor | tuple | list) -> torch.Tensor:
    """The prediction: ultralytics' detection model also returns its raw feature maps."""
    return output[0] if isinstance(output, (tuple, list)) else output


class FixedBatch(torch.nn.Module):
    """The compiled model for inputs in whole multiples of the batch it was compiled for;
    eager for any other, so that an odd batch never sets off a new compilation."""

    def __init__(self, eager: torch.nn.Module, compiled: Callable, batch: int):
        super().__init__()
        self.eager = eager
        self.compiled = compiled
        self.batch = batch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) % self.batch:
            return _first(self.eager(inputs))
        return torch.cat([_first(self.compiled(part)) for part in inputs.split(self.batch)])


def compiled_or_eager(model: torch.nn.Module, example: torch.Tensor, agree: Agreement,
                      name: str, reference: torch.nn.Module | None = None) -> torch.nn.Module:
    """``model`` compiled for inputs shaped like ``example``, where it agrees with ``reference``
    (by default ``model`` itself eager); else ``model``. Called under the autocast the model
    will run in: compiled code is specialised to it."""
    import torch._inductor.config as inductor

    inductor.freezing = True  # weights as constants: batch norms folded, weights packed once
    start = time.perf_counter()
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    try:
        with torch.inference_mode():
            # An inference tensor, as serving's are: compiled code is also specialised to that,
            # and a plain tensor here would have the first image compile it all again.
            example = example.clone()
            eager_out = _first((model if reference is None else reference)(example)).float()
            compiled_out = _first(compiled(example)).float()
    except Exception as error:  # no C++ compiler, or a graph inductor cannot take
        why = (str(error).splitlines() or [""])[0][:200]
        log.warning("%s: not compiled (%s: %s); it runs eager", name,
                    error.__class__.__name__, why)
        return model
    disagreement = agree(eager_out, compiled_out)
    if disagreement:
        log.warning("%s: compiled, but %s; it runs eager", name, disagreement)
        return model
    log.info("%s: compiled in %.0f s", name, time.perf_counter() - start)
    return FixedBatch(model, compiled, len(example))
