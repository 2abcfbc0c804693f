"""Scoring passes: how much the question attends to each placed token (InfoFlow), and fresh K/V at one layer
(CacheBlend's check). Both stop the forward early; the placed tensors are never written to.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .attention import Capture, StopForward, capture
from .cache import cache_from, position_mask
from .placement import PlacedContext


@torch.inference_mode()
def question_attention_scores(
    model: PreTrainedModel, placed: PlacedContext, query_ids: torch.Tensor, layers: list[int], heads: str = "mean"
) -> torch.Tensor:
    """InfoFlow score: mean over ``layers`` of the question's attention norm on each cached token. -> (N,)

    Only the question tokens run, on top of the placed cache, and the forward stops after the last
    scoring layer. The scoring cache is a throwaway: the placed tensors are never written to.
    """
    return attention_scores(model, placed.keys, placed.values, query_ids, placed.query_positions, layers, heads)


@torch.inference_mode()
def attention_scores(
    model: PreTrainedModel,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_ids: torch.Tensor,
    query_positions: torch.Tensor,
    layers: list[int],
    heads: str = "mean",
) -> torch.Tensor:
    """Mean over ``layers`` of the queries' attention norm on each of N cached entries. -> (N,)

    keys/values: (layers, kv_heads, N, head_dim), the context in any order; the queries see all of it and
    themselves causally. The forward stops after the last of ``layers``.
    """
    n = keys.shape[2]
    k_pos = torch.cat([torch.full((n,), -1), query_positions])
    mask = position_mask(query_positions, k_pos, model.dtype)
    c = Capture(score_layers=frozenset(layers), n_keys=n, stop_after=max(layers), heads=heads)
    with capture(c):
        try:
            model(
                input_ids=query_ids[None],
                position_ids=query_positions[None],
                attention_mask=mask,
                cache=cache_from(keys, values),
                logits_to_keep=1,
            )
        except StopForward:
            pass
    if c.scores is None:
        raise RuntimeError("no scoring layer ran: is the model using the 'infoflow' attention implementation?")
    return c.scores / len(c.layers_seen)


@torch.inference_mode()
def fresh_layer_kv(model: PreTrainedModel, placed: PlacedContext, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of every cached passage token at ``layer`` under full causal attention over the placed context.

    The prefix stays cached (it is exact); everything after it runs through layers 0..layer only.
    Returns keys, values (kv_heads, N - p, head_dim) for the tokens after the prefix.
    """
    p = placed.prefix_len
    ids, pos = placed.token_ids[p:], placed.positions[p:]
    mask = position_mask(pos, placed.positions, model.dtype)
    cache = cache_from(placed.keys[:, :, :p], placed.values[:, :, :p])
    with capture(Capture(score_layers=frozenset(), n_keys=0, stop_after=layer, stop_before_attention=True)):
        try:
            model(
                input_ids=ids[None],
                position_ids=pos[None],
                attention_mask=mask,
                cache=cache,
                logits_to_keep=1,
            )
        except StopForward:
            pass
    return cache.layers[layer].keys[0, :, p:], cache.layers[layer].values[0, :, p:]
