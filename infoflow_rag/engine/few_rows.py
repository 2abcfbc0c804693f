"""Linear layers of a few rows on the compiled kernel (few_row_linear.cpp): one row per decoded token, the first
token's logits (:mod:`.linears` routes them here; a question's rows in a scoring pass are more than FEW_ROWS). Such
a product reads every weight once and does little with each, so it runs as fast as the weights stream from memory,
which MKL's sgemm does at ~7-11 GB/s for 1-13 rows on this project's 2-core EPYC, the kernel at ~14-28 GB/s; oneDNN's
product over packed weights, which more rows run, is faster than the kernel from 4 rows up (FEW_ROWS below; README,
"Linear layers of a few rows").
"""

from __future__ import annotations

import torch

from . import kernels

# Up to this many rows take the kernel, more oneDNN's product over packed weights (linears.py). Over every decoder
# layer's weights in turn (cold), the kernel against oneDNN: SmolLM2 17.6 vs 22.5 ms at 1 row, 19.6 vs 24.0 at 2,
# 19.7 vs 20.1 at 3, 22.2 vs 19.7 at 4, 45.4 vs 27.8 at 13; Qwen2.5-0.5B 50.5 vs 61.5, 43.1 vs 69.8, 43.5 vs 45.4,
# 52.2 vs 43.7, 92.7 vs 69.1. (Against MKL's sgemm it won up to 32 rows.)
FEW_ROWS = 3


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
