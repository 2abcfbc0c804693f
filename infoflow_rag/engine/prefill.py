"""Prefill: the fixed prefix, passages alone behind it (at local positions), and plain full prefill.

Each is a stock ``model(...)`` call with explicit positions; passages and the prefix also pass an explicit mask
(see :mod:`.cache`), full prefill none, so its attention runs causal (see :func:`full_prefill`).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache, PreTrainedModel

from ..kv import PassageKV
from . import last_layer, linears
from .attention import StopForward
from .cache import appending_cache, cache_from, position_mask, stacked
from .recompute import Recomputed
from .signals import recording


@torch.inference_mode()
def prefill_prefix(model: PreTrainedModel, prefix_ids: list[int]) -> PassageKV:
    """The fixed prefix at positions 0 .. p-1 (the attention sink every passage is prefilled behind)."""
    ids = torch.tensor(prefix_ids, dtype=torch.long)
    cache = DynamicCache()
    # The many-row product: K/V bit for bit as full prefill computes them. Only the K/V are read.
    with linears.batched_linears(), last_layer.keys_values_only(model), contextlib.suppress(StopForward):
        model(
            input_ids=ids[None],
            position_ids=torch.arange(len(ids))[None],
            cache=cache,
            logits_to_keep=1,
        )
    keys, values = stacked(cache)
    return PassageKV(ids, keys[:, 0], values[:, 0], offset=0)


@torch.inference_mode()
def prefill_passages(
    model: PreTrainedModel, prefix: PassageKV, passages: list[list[int]], signals: bool = True
) -> list[PassageKV]:
    """Prefill one batch of passages, each alone behind ``prefix``, at local positions p .. p+n-1.

    Right padding keeps this exact: under the causal mask no real token sees the padding after it.
    With ``signals``, the same forward records each token's question-independent signals (see :mod:`signals`).
    """
    p, longest = len(prefix), max(len(t) for t in passages)
    ids = torch.zeros(len(passages), longest, dtype=torch.long)  # (B, n), padded with token 0
    for row, tokens in enumerate(passages):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    positions = p + torch.arange(longest)
    dtype = model.dtype
    batch = len(passages)
    cache = cache_from(
        prefix.keys.to(dtype)[:, None].expand(-1, batch, -1, -1, -1),
        prefix.values.to(dtype)[:, None].expand(-1, batch, -1, -1, -1),
    )
    mask = position_mask(positions, torch.cat([torch.arange(p), positions]), dtype)
    # The many-row product even for a short passage alone: K/V bit for bit as full prefill computes them
    # (linears.batched_linears); the signals' entropy too, so that a prefill is the same computation whatever its size.
    # Without signals only the K/V are read: the forward stops once the last layer's are in the cache.
    with recording(model) if signals else last_layer.keys_values_only(model) as recorder, linears.batched_linears():
        with contextlib.suppress(StopForward):
            model(
                input_ids=ids,
                position_ids=positions.expand(batch, -1),
                attention_mask=mask,
                cache=cache,
                logits_to_keep=1,
            )
        recorded = recorder.signals(model) if signals else {}  # name -> (B, longest)
    keys, values = stacked(cache)  # (layers, B, kv_heads, p + longest, head_dim)
    return [
        PassageKV(
            ids[row, : len(t)].clone(),
            keys[:, row, :, p : p + len(t)].clone(),
            values[:, row, :, p : p + len(t)].clone(),
            offset=p,
            signals={name: s[row, : len(t)].clone() for name, s in recorded.items()},
        )
        for row, t in enumerate(passages)
    ]


@torch.inference_mode()
def full_prefill(model: PreTrainedModel, ids: list[int] | torch.Tensor) -> Recomputed:
    """The reference: the whole prompt in one plain causal forward, nothing cached.

    No mask is passed: with nothing cached and no padding, the attention runs causal on the compiled kernel
    (engine/sparse_kernel.py) or, where it did not build, SDPA's ``is_causal`` path; both skip the masked half of
    the scores and read grouped K/V heads without copying them. Its last layer computes the last row's output only
    (:mod:`.last_layer`; every row's K/V). The fastest plain prefill this stack offers, so speedups are measured
    against it, not against a slow reference.
    """
    t = torch.as_tensor(ids, dtype=torch.long)
    pos = torch.arange(len(ids))
    cache = appending_cache(model.config.num_hidden_layers)  # decoding appends to it
    with last_layer.last_row_only(model):
        out = model(input_ids=t[None], position_ids=pos[None], cache=cache, logits_to_keep=1)
    return Recomputed(out.logits[0, -1].float(), cache, len(ids), pos)
