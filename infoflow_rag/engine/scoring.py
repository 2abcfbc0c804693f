"""Scoring passes: how much the question attends to each placed token (InfoFlow), and fresh K/V at one layer
(CacheBlend's check). Both stop the forward early; the placed tensors are never written to.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from .attention import Capture, SparseQueries, StopForward, capture, sparse_queries
from .cache import cache_from, position_mask, slotted_cache
from .placement import PlacedContext


@torch.inference_mode()
def question_attention_scores(
    model: PreTrainedModel, placed: PlacedContext, query_ids: torch.Tensor, layers: list[int], heads: str = "mean"
) -> torch.Tensor:
    """InfoFlow score: mean over ``layers`` of the question's attention norm on each cached token. -> (N,)

    Only the question tokens run, on top of the placed cache, and the forward stops after the last
    scoring layer. The placed keys/values are never written to.
    """
    n, q_pos = placed.token_ids.numel(), placed.query_positions
    if not (placed.cached_first and int(q_pos.min()) >= n):
        return attention_scores(model, placed.keys, placed.values, query_ids, q_pos, layers, heads)
    # The question's K/V go into its own, still empty, prompt slots (the recompute fills them again later)
    # instead of being appended to a copy of the whole cache on every layer.
    end = int(q_pos.max()) + 1
    k_pos = torch.full((end,), end)  # fresh slots the question does not fill stay masked
    k_pos[:n] = -1  # every cached token is visible to every question row
    k_pos[q_pos] = q_pos
    cache = slotted_cache(placed.prompt_keys[:, :, :end], placed.prompt_values[:, :, :end], q_pos)
    return _scores(model, cache, k_pos, query_ids, q_pos, n, layers, heads)


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
    return _scores(model, cache_from(keys, values), k_pos, query_ids, query_positions, n, layers, heads)


def _scores(
    model: PreTrainedModel,
    cache: DynamicCache,
    k_pos: torch.Tensor,
    query_ids: torch.Tensor,
    query_positions: torch.Tensor,
    n_keys: int,
    layers: list[int],
    heads: str,
) -> torch.Tensor:
    """The queries' forward over ``cache`` (keys at ``k_pos`` once the queries are in), scoring its first
    ``n_keys`` entries on ``layers``. -> (n_keys,)"""
    mask = position_mask(query_positions, k_pos, model.dtype)
    c = Capture(score_layers=frozenset(layers), n_keys=n_keys, stop_after=max(layers), heads=heads)
    with capture(c):
        try:
            model(
                input_ids=query_ids[None],
                position_ids=query_positions[None],
                attention_mask=mask,
                cache=cache,
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

    Placed in prompt order (in any geometry: it rotates the keys, the positions ascend), each token sees the cache
    up to its own entry, the recompute's case with every token a query: it runs as one, its cache indices p..N-1 as
    the plan's positions, on the compiled kernel rather than SDPA under an (N - p, N) mask (SmolLM2, 4K,
    alternating: the check pass 480 -> 288 ms, the same picks; README, "CacheBlend's check pass").
    """
    p, n = placed.prefix_len, placed.token_ids.numel()
    ids, pos = placed.token_ids[p:], placed.positions[p:]
    cache = cache_from(placed.keys[:, :, :p], placed.values[:, :, :p])
    check = Capture(score_layers=frozenset(), n_keys=0, stop_after=layer, stop_before_attention=True)
    with capture(check), sparse_queries(SparseQueries(torch.arange(p, n))):
        try:
            model(
                input_ids=ids[None],
                position_ids=pos[None],
                cache=cache,  # no mask: the plan's positions say what each token sees (attention.infoflow_mask)
                logits_to_keep=1,
            )
        except StopForward:
            pass
    return cache.layers[layer].keys[0, :, p:], cache.layers[layer].values[0, :, p:]
