"""A compiled attention kernel (sparse_kernel.cpp) for queries sorted by position, each attending to the key prefix
its position sees: the recompute's sparse queries, and full prefill's causal forward (every position a query).
No key block past a row block's last limit is computed.

torch's CPU flash kernel computes every block under an explicit mask, so the torch path for the recompute
(:func:`~infoflow_rag.engine.attention.chunked_attention`) splits the queries into chunks of two calls each; on
SmolLM2 at 4K that ran at ~110 GFLOP/s against ~150 for the same work in one dense call. This kernel runs its
blocks the way torch's flash kernel runs its own (two products and an online softmax) and skips the masked ones;
its products run on oneDNN's GEMM microkernel, which torch carries (~110 GFLOP/s a thread here, against ~94 for
MKL's sgemm on the same blocks). A row's output does not depend on the rows that share its block, so a prefix
prefilled alone gets full prefill's rows bit for bit.
How it is built, and what happens where it cannot be: :mod:`.kernels`.
"""

from __future__ import annotations

import torch

from . import kernels


def sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """Attention of sorted sparse queries over a cache in prompt order (key j at position j) under pos_k <= pos_q,
    or None where the kernel does not apply (not built, not float32 on the CPU, a batch of several prompts, or
    a forward that records gradients: the kernel has no backward).

    query: (1, heads, Q, d); key/value: (1, kv_heads, M, d), any head stride (the recompute's heads sit in the placed
    buffers, with room for the answer after each); positions: (Q,) ascending.
    Returns (1, Q, heads, d) like transformers' attention functions.
    """
    kernel = kernels.for_attention(query, key, value)
    if kernel is None:
        return None
    _, n_heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    group = n_heads // kv_heads
    # Query head g*group + j reads K/V head g. Its rows go position-major, so a block's rows share their key limits
    # across the group, and each K/V block is read once for all of them.
    rows = query[0].view(kv_heads, group, q_len, d).transpose(1, 2).reshape(kv_heads, q_len * group, d)
    limits = (positions + 1).repeat_interleave(group)  # (Q * group,): row r sees keys [0, limits[r])
    out = kernel.sparse_row_attention(rows, key[0], value[0], limits, scaling)  # (kv_heads, Q * group, d)
    return out.view(kv_heads, q_len, group, d).permute(1, 0, 2, 3).reshape(1, q_len, n_heads, d)
