"""A compiled attention kernel for a few query rows over a whole cache (few_row_attention.cpp): a decoding step's one
row per query head, and a question's rows in a scoring pass, with the probabilities InfoFlow scores. The keys are
split into chunks over the threads and merged by their softmax statistics. torch's CPU flash kernel gives such a call
one work item per query head, each walking the whole cache; on SmolLM2's decode shapes (9 query heads over 3 K/V
heads, 30 layers, cold caches) the kernel took 9.1 against 16.0 ms per token at 4K keys and 19.6 against 38.3 ms at
8K. A question's rows in a scoring pass ran as two batched matmuls, the mask added and the softmax taken in passes
of their own; with the mask and softmax inside the kernel, SmolLM2's scoring pass at 4K took 111 against 135 ms and
Qwen2.5-0.5B's 174 against 185 ms (alternating in one process). How it is built, and what happens where it cannot
be: :mod:`.kernels`.
"""

from __future__ import annotations

import torch

from . import kernels


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """A decoding step's attention (one query position over every key): :func:`few_row_attention`'s output, or None
    where that does not apply or the query has more than one row.

    query: (1, heads, 1, d); key/value: (1, kv_heads, M, d), any head stride. Returns (1, 1, heads, d) like
    transformers' attention functions.
    """
    if query.shape[2] != 1:
        return None
    got = few_row_attention(query, key, value, None, scaling, 0)
    return None if got is None else got[0]


def few_row_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    mask: torch.Tensor | None,
    scaling: float,
    n_probs: int,
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """softmax(QK^T * scaling + mask) V of a few query rows, and the probabilities of the first ``n_probs`` keys; or
    None where the kernel does not apply (not built, not float32 on the CPU, a batch of several prompts, no keys,
    K/V rows not contiguous, a mask that is not (1, 1, q, M) with contiguous rows, or a forward that records
    gradients).

    query: (1, heads, q, d); key/value: (1, kv_heads, M, d), any head stride, value None where only the probabilities
    are wanted; mask: additive (1, 1, q, M) or None. Returns the output (1, q, heads, d) like transformers' attention
    functions (None without ``value``), and the probabilities (kv_heads, group, q, n_probs): query head g*group + j
    is [g, j], as in :func:`.attention.attention_probabilities`.
    """
    _, n_heads, q_len, d = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    cache = [key] if value is None else [key, value]
    if n_keys == 0 or not all(t.stride(-1) == 1 and t.stride(-2) == d for t in cache):
        return None
    if mask is not None and (mask.shape != (1, 1, q_len, n_keys) or mask.stride(-1) != 1):
        return None
    kernel = kernels.for_attention(query, *cache, *([] if mask is None else [mask]))
    if kernel is None:
        return None
    group = n_heads // kv_heads
    rows = query[0].reshape(kv_heads, group * q_len, d)  # group-major: folded row j*q + r is head g*group + j, row r
    values = None if value is None else value[0]
    out, probs = kernel.few_row_attention(rows, key[0], values, None if mask is None else mask[0, 0], scaling, n_probs)
    output = None if value is None else out.view(1, n_heads, q_len, d).transpose(1, 2)
    return output, probs.view(kv_heads, group, q_len, n_probs)
