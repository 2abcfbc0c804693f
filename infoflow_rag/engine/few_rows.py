"""Linear layers of a few rows on the compiled kernel (few_row_linear.cpp): the question's rows in a scoring pass,
one row per decoded token, the first token's logits (:mod:`.linears` routes them here). Such a product reads every
weight once and does little with each, so it runs as fast as the weights stream from memory, which MKL's sgemm does
at ~7-11 GB/s for 1-13 rows on this project's 2-core EPYC, the kernel at ~14-28 GB/s (README, "Linear layers of a
few rows").
"""

from __future__ import annotations

import torch

from . import kernels

# Up to this many rows take the kernel. Over 28 SmolLM2 layers' weights (cold), it beat MKL's sgemm by 2.3x at 1
# row, 1.5x at 13, 1.2x at 32, and lost at 64.
FEW_ROWS = 32


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` on the kernel, or None where it does not apply (more than FEW_ROWS rows, not
    built, not float32 on the CPU, or a forward that records gradients). x: (..., K); weight: (N, K) -> (..., N)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not 0 < rows <= FEW_ROWS:
        return None
    kernel = kernels.for_tensors(x, weight, *(() if bias is None else (bias,)))
    if kernel is None:
        return None
    return kernel.few_row_linear(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
