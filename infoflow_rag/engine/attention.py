"""Attention probabilities on chosen layers, without eager attention everywhere.

One attention function, registered with transformers under the name ``infoflow``, runs SDPA as usual.
Inside :func:`capture`, it also accumulates the question's attention norm on the scoring layers, and
it can stop the forward once a given layer is done, so no layer after the last one needed ever runs.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTN_IMPLEMENTATION = "infoflow"
QUERY_CHUNK = 256  # question rows per probability block: bounds memory at (heads, 256, keys)
# How a layer's heads combine into one score per key: the published mean of the attention probabilities,
# or the largest per-head attention norm (a key one head reads strongly is not averaged away by the rest).
HEAD_REDUCTIONS = ("mean", "max")


class StopForward(Exception):
    """Raised inside the forward once the last layer that matters has run."""


@dataclass
class Capture:
    score_layers: frozenset[int]  # layers whose attention norm is accumulated
    n_keys: int  # the first n_keys keys are the scored context
    stop_after: int  # raise StopForward after this layer's attention (or right after its K/V for cacheblend)
    stop_before_attention: bool = False  # True: only the layer's K/V are wanted, skip its attention
    heads: str = "mean"  # one of HEAD_REDUCTIONS
    scores: torch.Tensor | None = None  # (n_keys,) sum over scoring layers of s_l
    layers_seen: list[int] = field(default_factory=list)


@dataclass
class SparseQueries:
    """Recompute queries sorted by position over a cache in prompt order (key j at position j): a query chunk
    ending at position P sees only keys [0, P], so the masked blocks after it are never computed."""

    input_positions: torch.Tensor  # (Q,) ascending: the queries' positions
    chunks: int = 8


_active: ContextVar[Capture | None] = ContextVar("infoflow_capture", default=None)
_sparse: ContextVar[SparseQueries | None] = ContextVar("infoflow_sparse", default=None)


@contextlib.contextmanager
def _setting(var: ContextVar, value):
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def capture(c: Capture) -> contextlib.AbstractContextManager[Capture]:
    """Within: accumulate attention norms on ``c.score_layers`` and stop after ``c.stop_after``."""
    return _setting(_active, c)


def sparse_queries(plan: SparseQueries) -> contextlib.AbstractContextManager[SparseQueries]:
    """Within: recompute forwards attend per query chunk to the visible key prefix only."""
    return _setting(_sparse, plan)


def chunked_attention(query, key, value, mask, plan: SparseQueries, scaling: float | None = None):
    """SDPA per query chunk over the visible key prefix (views, nothing copied); same result as one call with
    the full mask.

    query: (B, heads, Q, d); key/value: (B, kv_heads, M, d) in prompt order; mask: (B, 1, Q, M).
    Returns (B, Q, heads, d) like transformers' attention functions.
    """
    q_len = plan.input_positions.numel()
    step = max(64, -(-q_len // plan.chunks))
    outputs = []
    for a in range(0, q_len, step):
        b = min(a + step, q_len)
        end = int(plan.input_positions[b - 1]) + 1  # keys after the chunk's last query are masked for all of it
        outputs.append(
            masked_sdpa(query[:, :, a:b], key[:, :, :end], value[:, :, :end], mask[:, :, a:b, :end], scaling)
        )
    return torch.cat(outputs, dim=1), None


def masked_sdpa(query, key, value, mask, scaling: float | None) -> torch.Tensor:
    """torch's SDPA under an explicit mask with grouped K/V heads read in place. -> (B, q, heads, d)

    transformers copies every K/V head group out (repeat_kv) whenever a mask is given; ``enable_gqa`` makes
    the same call without the copies (7 query heads per K/V head on Qwen2.5-0.5B).
    """
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def attention_norm(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    n_keys: int,
    heads: str = "mean",
) -> torch.Tensor:
    """s[k] = || mean_heads softmax(QK^T * scaling + mask)[:, k] ||_2 over question rows, for the first n_keys keys;
    with ``heads="max"``, max over heads of each head's || softmax(...)[:, k] ||_2 instead.

    query: (1, heads, q, d); key: (1, kv_heads, K, d) (GQA: expanded to the query heads);
    mask: additive (1, 1, q, K) or None. Returns (n_keys,) float32.
    """
    n_heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(n_heads // kv_heads, dim=1).float()  # (1, heads, K, d)
    sq = torch.zeros(n_heads if heads == "max" else 1, n_keys, dtype=torch.float32, device=query.device)
    for start in range(0, query.shape[2], QUERY_CHUNK):
        q = query[:, :, start : start + QUERY_CHUNK].float()  # (1, heads, c, d)
        logits = q @ key.transpose(-1, -2) * scaling  # (1, heads, c, K)
        if mask is not None:
            logits = logits + mask[:, :, start : start + QUERY_CHUNK].float()
        probs = logits.softmax(dim=-1)[0, :, :, :n_keys]  # (heads, c, n_keys)
        if heads == "mean":
            probs = probs.mean(dim=0, keepdim=True)  # (1, c, n_keys)
        sq += probs.pow(2).sum(dim=1)
    return sq.sqrt().max(dim=0).values


def infoflow_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    c = _active.get()
    layer = getattr(module, "layer_idx", None)
    if c is not None and layer == c.stop_after and c.stop_before_attention:
        raise StopForward
    if c is not None and layer in c.score_layers:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        s = attention_norm(query, key, attention_mask, scale, c.n_keys, c.heads)
        c.scores = s if c.scores is None else c.scores + s
        c.layers_seen.append(layer)
    if c is not None and layer == c.stop_after:
        raise StopForward
    plan = _sparse.get()
    if plan is not None and query.shape[2] == plan.input_positions.numel() and attention_mask is not None:
        return chunked_attention(query, key, value, attention_mask, plan, scaling=scaling)  # inference: no dropout
    if attention_mask is not None and query.shape[2] > 1:  # prefill, scoring, teacher forcing: all explicit masks
        return masked_sdpa(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> str:
    """Register the attention function and its mask function (without the latter the mask silently becomes None)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, infoflow_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
