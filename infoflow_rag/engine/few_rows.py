"""Linear layers of a few rows on the compiled kernel (few_row_linear.cpp): the question's rows in a scoring pass,
one row per decoded token, the first token's logits. Such a product reads every weight once and does little with
each, so it runs as fast as the weights stream from memory, which MKL's sgemm does at ~7-11 GB/s for 1-13 rows on
this project's 2-core EPYC, the kernel at ~14-28 GB/s (README, "Linear layers of a few rows").
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

# Up to this many rows take the kernel. Over 28 SmolLM2 layers' weights (cold), it beat MKL's sgemm by 2.3x at 1
# row, 1.5x at 13, 1.2x at 32, and lost at 64.
FEW_ROWS = 32
_torch_only: ContextVar[bool] = ContextVar("few_rows_torch_only", default=False)


@contextlib.contextmanager
def torch_linears():
    """Within: every linear layer runs ``F.linear``. Prefills run so. MKL gives a row the same product whatever
    the number of rows, the kernel sums in another order: a prefix or passage prefilled on MKL has the K/V full
    prefill computes for the same tokens, bit for bit, so 100 % recompute still equals full prefill exactly (the
    correctness gate). A one-time prefill's speed is not what the kernel is for."""
    token = _torch_only.set(True)
    try:
        yield
    finally:
        _torch_only.reset(token)


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` on the kernel, or None where it does not apply (more than FEW_ROWS rows, within
    :func:`torch_linears`, not built, not float32 on the CPU, or a forward that records gradients).
    x: (..., K); weight: (N, K) -> (..., N)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not 0 < rows <= FEW_ROWS or _torch_only.get():
        return None
    kernel = kernels.for_tensors(x, weight, *(() if bias is None else (bias,)))
    if kernel is None:
        return None
    return kernel.few_row_linear(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class FewRowLinear(nn.Linear):
    """An ``nn.Linear`` whose forward of a few rows runs the kernel; any other input runs ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = few_row_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) if out is None else out


def install(model: nn.Module) -> None:
    """Every ``nn.Linear`` of ``model`` becomes a :class:`FewRowLinear`. Its class is swapped in place, not the
    module copied: parameters, tied weights and hooks stay as they are. Installing twice changes nothing."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowLinear
