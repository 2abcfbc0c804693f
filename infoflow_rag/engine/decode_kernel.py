"""A compiled attention kernel for one decoding step (decode_attention.cpp): each query head's one row over every
cached key, the keys split into chunks over the threads and merged by their softmax statistics. torch's CPU flash
kernel gives such a call one work item per query head, each walking the whole cache; on SmolLM2's decode shapes
(9 query heads over 3 K/V heads, 30 layers, cold caches) the kernel took 9.1 against 16.0 ms per token at 4K keys
and 19.6 against 38.3 ms at 8K. How it is built, and what happens where it cannot be: :mod:`.kernels`.
"""

from __future__ import annotations

import torch

from . import kernels


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """Attention of one query position over every key, or None where the kernel does not apply (not built, not
    float32 on the CPU, a batch of several prompts, no keys, K/V rows not contiguous, or a forward that records
    gradients).

    query: (1, heads, 1, d); key/value: (1, kv_heads, M, d), any head stride. Returns (1, 1, heads, d) like
    transformers' attention functions.
    """
    rows_contiguous = all(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] for t in (key, value))
    if query.shape[2] != 1 or key.shape[2] == 0 or not rows_contiguous:
        return None
    kernel = kernels.for_attention(query, key, value)
    if kernel is None:
        return None
    _, n_heads, _, d = query.shape
    kv_heads = key.shape[1]
    rows = query[0].reshape(kv_heads, n_heads // kv_heads, d)  # query head g*group + j reads K/V head g
    return kernel.decode_attention(rows, key[0], value[0], scaling).view(1, 1, n_heads, d)
