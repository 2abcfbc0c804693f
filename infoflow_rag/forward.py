"""Every model forward the engine runs, each a stock ``model(...)`` call with explicit positions and mask.

An explicit additive 4D mask is always passed: with SDPA and no mask transformers assumes is_causal,
which is wrong for sparse queries, and a bool mask would be wrong under eager attention.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from .attention import Capture, SparseQueries, StopForward, capture, sparse_queries
from .kv import PassageKV
from .layout import PlacedContext
from .signals import recording


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (1, 1, q, K): query i sees key j iff pos_k[j] <= pos_q[i]."""
    visible = k_pos[None, :] <= q_pos[:, None]  # (q, K)
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def cache_from(keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
    """keys/values (layers, kv_heads, n, head_dim) or (layers, B, kv_heads, n, head_dim) -> DynamicCache.

    The layers take the given tensors as they are (no copy); the forward's update concatenates onto them
    into new tensors, so the caller's tensors are never written to.
    """
    if keys.dim() == 4:
        keys, values = keys[:, None], values[:, None]
    cache = DynamicCache()
    for k, v in zip(keys.unbind(0), values.unbind(0), strict=True):
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def stacked(cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
    """DynamicCache -> keys, values (layers, B, kv_heads, n, head_dim)."""
    return torch.stack([layer.keys for layer in cache.layers]), torch.stack([layer.values for layer in cache.layers])


def truncate(cache: DynamicCache, entries: int) -> None:
    """Keep the first ``entries`` cache entries of every layer (what a forward appended after them goes)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :entries], layer.values[:, :, :entries]


@torch.inference_mode()
def prefill_prefix(model: PreTrainedModel, prefix_ids: list[int]) -> PassageKV:
    """The fixed prefix at positions 0 .. p-1 (the attention sink every passage is prefilled behind)."""
    ids = torch.tensor(prefix_ids, dtype=torch.long)
    cache = DynamicCache()
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
    with recording(model) if signals else contextlib.nullcontext() as recorder:
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


@dataclass
class Recomputed:
    logits: torch.Tensor  # (vocab,) float32: next-token logits after the last prompt token
    cache: DynamicCache  # unselected cached tokens + recomputed + fresh tokens (order irrelevant: keys carry RoPE)
    next_position: int  # position of the first generated token
    positions: torch.Tensor  # (M,) prompt position of each cache entry, in cache order


@torch.inference_mode()
def recompute(
    model: PreTrainedModel,
    placed: PlacedContext,
    selected: torch.Tensor,
    fresh_ids: torch.Tensor,
    fresh_positions: torch.Tensor,
) -> Recomputed:
    """Run selected cached tokens + fresh tokens through every layer at their global positions.

    selected: (s,) indices into the placed tokens. The cache holds the other cached tokens; the forward
    appends fresh K/V for the inputs, which attend to the mixed cache under pos_k <= pos_q. Unselected
    tokens are never forwarded.
    """
    keep = torch.ones(placed.token_ids.numel(), dtype=torch.bool)
    keep[selected] = False
    inputs = torch.cat([placed.token_ids[selected], fresh_ids])
    in_pos = torch.cat([placed.positions[selected], fresh_positions])
    order = in_pos.argsort()
    inputs, in_pos = inputs[order], in_pos[order]
    cached_pos = placed.positions[keep]  # ascending: placed tokens are in prompt order
    mask = position_mask(in_pos, torch.cat([cached_pos, in_pos]), model.dtype)
    cache = cache_from(placed.keys[:, :, keep], placed.values[:, :, keep])
    with sparse_queries(SparseQueries(cached_pos, in_pos)):
        out = model(
            input_ids=inputs[None],
            position_ids=in_pos[None],
            attention_mask=mask,
            cache=cache,
            logits_to_keep=1,
        )
    return Recomputed(out.logits[0, -1].float(), cache, int(in_pos.max()) + 1, torch.cat([cached_pos, in_pos]))


@torch.inference_mode()
def teacher_force(model: PreTrainedModel, out: Recomputed, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits along ``tokens`` fed after the prompt in ``out``'s cache, in one forward. -> (n+1, vocab)

    Row 0 is the prompt's own next-token logits (``out.logits``); row i+1 follows ``tokens[: i + 1]``. The
    cache is cut back to its prompt entries before (decoding may have appended to it) and after, so the
    caller's cache holds exactly the prompt again.
    """
    if len(tokens) == 0:
        return out.logits[None]
    prompt_entries = out.positions.numel()
    truncate(out.cache, prompt_entries)
    positions = out.next_position + torch.arange(len(tokens))
    mask = position_mask(positions, torch.cat([out.positions, positions]), model.dtype)
    try:
        logits = model(
            input_ids=tokens[None],
            position_ids=positions[None],
            attention_mask=mask,
            cache=out.cache,
        ).logits[0]  # (n, vocab)
    finally:
        truncate(out.cache, prompt_entries)
    return torch.cat([out.logits[None], logits.float()])


@torch.inference_mode()
def full_prefill(model: PreTrainedModel, ids: list[int]) -> Recomputed:
    """The reference: the whole prompt in one plain causal forward, nothing cached."""
    t = torch.tensor(ids, dtype=torch.long)
    pos = torch.arange(len(ids))
    cache = DynamicCache()
    out = model(
        input_ids=t[None],
        position_ids=pos[None],
        attention_mask=position_mask(pos, pos, model.dtype),
        cache=cache,
        logits_to_keep=1,
    )
    return Recomputed(out.logits[0, -1].float(), cache, len(ids), pos)
