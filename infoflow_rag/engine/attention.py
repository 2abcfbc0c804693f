"""The attention function every forward of the engine runs, registered with transformers as ``infoflow``.

Inside :func:`capture` (scoring passes), it accumulates the question's attention norm on the scoring layers and
stops the forward once the last layer needed is done. Inside :func:`sparse_queries` (the recompute, CacheBlend's
check pass), and for a causal forward with nothing cached (full prefill), it runs the compiled kernel
(:mod:`.sparse_kernel`) or, where that did not build, the torch paths: :func:`chunked_attention` and SDPA's causal
kernel. A decoding step and a question's rows in a scoring pass run a kernel for a few rows
(:mod:`.few_row_attention`), or SDPA and :func:`grouped_attention`'s matmuls. Anything else (passage prefill under
an explicit mask, teacher forcing) runs SDPA. On the last layer it computes only what :mod:`.last_layer` says the
caller reads: the last row (full prefill, the recompute), or nothing past the K/V (a prefill without signals).
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

from . import last_layer
from .few_row_attention import decode_attention, few_row_attention
from .sparse_kernel import sparse_attention

ATTN_IMPLEMENTATION = "infoflow"
QUERY_CHUNK = 256  # question rows per probability block: bounds memory at (heads, 256, keys)
# How a layer's heads combine into one score per key: the published mean of the attention probabilities,
# or the largest per-head attention norm (a key one head reads strongly is not averaged away by the rest).
HEAD_REDUCTIONS = ("mean", "max")
# Where the compiled kernel (sparse_kernel) does not run, a sparse recompute's query chunk ends at FOLDED_ROWS rows
# (heads folded in) or once its positions span CHUNK_SPAN keys: long row blocks keep the flash kernel efficient, a
# short span keeps its masked work small. On one layer's attention over InfoFlow's picks at 15 % (SmolLM2, 4K),
# this took 38 ms against 45 ms with the row limit alone, whose first chunk spans most of the context; 159 against
# 168 ms at 8K; the same on Qwen2.5-0.5B at 4K.
FOLDED_ROWS = 1024
CHUNK_SPAN = 1024
# torch's CPU flash kernel, called directly because SDPA does not return the log-sum-exp that merging needs.
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


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
    """Queries sorted by position over a cache in prompt order (key j at position j), under the mask
    pos_k <= pos_q: a query chunk from position F to P sees every key before F and, of [F, P], only its own
    prefix; keys after P are never computed. The recompute's, and CacheBlend's check pass, whose tokens each see
    the cache up to their own entry (:func:`.scoring.fresh_layer_kv`: positions are cache indices there)."""

    input_positions: torch.Tensor  # (Q,) ascending: the queries' positions (their entries in the cache)
    _chunks: dict[int, list[tuple[int, int]]] = field(default_factory=dict, repr=False)  # by query heads per K/V
    _span_masks: dict[tuple[int, torch.dtype], list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def chunks(self, group: int) -> list[tuple[int, int]]:
        """Query index ranges [a, z), one per chunk, for ``group`` query heads per K/V head; computed once per
        plan, not per layer."""
        if group not in self._chunks:
            pos, limit = self.input_positions.tolist(), max(1, FOLDED_ROWS // group)
            bounds, a = [], 0
            for z in range(1, len(pos) + 1):
                if z == len(pos) or z - a == limit or pos[z] - pos[a] >= CHUNK_SPAN:
                    bounds.append((a, z))
                    a = z
            self._chunks[group] = bounds
        return self._chunks[group]

    def span_masks(self, group: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each chunk's additive mask over its own span, query i seeing key j iff j <= its position, rows repeated
        for ``group`` folded query heads: (1, 1, group * n, span) per chunk. Built from the positions on a forward's
        first layer and reused by the others; the whole (Q, M) mask is never formed."""
        if (group, dtype) not in self._span_masks:
            masks = []
            for a, z in self.chunks(group):
                pos = self.input_positions[a:z]
                span = torch.arange(int(pos[0]), int(pos[-1]) + 1)
                mask = torch.zeros(z - a, span.numel(), dtype=dtype)
                mask.masked_fill_(span[None, :] > pos[:, None], torch.finfo(dtype).min)
                masks.append(mask[None, None].repeat(1, 1, group, 1))
            self._span_masks[group, dtype] = masks
        return self._span_masks[group, dtype]


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


def chunked_attention(query, key, value, plan: SparseQueries, scaling: float | None = None):
    """The torch path for :func:`~infoflow_rag.engine.sparse_kernel.sparse_attention`, where the compiled kernel
    does not run. Attention of sorted sparse queries, per query chunk in two flash calls merged by their
    log-sum-exp: the keys before the chunk's first position, which every query in it sees (no mask), and the
    chunk's own span under the mask. Same result as one SDPA call with the whole mask, to float rounding.

    Each call folds a K/V head's group of query heads into rows, so the kernel reads every K/V block once per
    group instead of once per head and works on long row blocks. Chunks come from ``plan.chunks``. What it buys
    against masked SDPA over 8 chunks is measured end to end in the README ("The recompute's attention").

    query: (B, heads, Q, d); key/value: (B, kv_heads, M, d) in prompt order; the chunks' masks come from the
    plan's positions (``plan.span_masks``). Returns (B, Q, heads, d) like transformers' attention functions.
    """
    b, n_heads, _, d = query.shape
    kv_heads = key.shape[1]
    group = n_heads // kv_heads
    outputs = []
    for (a, z), span_mask in zip(plan.chunks(group), plan.span_masks(group, query.dtype), strict=True):
        first, end = int(plan.input_positions[a]), int(plan.input_positions[z - 1]) + 1
        rows = query[:, :, a:z].reshape(b, kv_heads, group * (z - a), d)  # query heads g*group.. read K/V head g
        out, lse = _flash(rows, key[:, :, first:end], value[:, :, first:end], attn_mask=span_mask, scale=scaling)
        if first > 0:
            before, lse_before = _flash(rows, key[:, :, :first], value[:, :, :first], scale=scaling)
            out = merge_attention(before, lse_before, out, lse)
        outputs.append(out.reshape(b, n_heads, z - a, d).transpose(1, 2))
    return torch.cat(outputs, dim=1), None


def merge_attention(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """Attention over two disjoint key sets -> attention over their union, from each part's output (..., q, d)
    and log-sum-exp (..., q): each part weighs by its share of the union's softmax mass."""
    top = torch.maximum(lse_a, lse_b)
    w_a, w_b = (lse_a - top).exp_().unsqueeze(-1), (lse_b - top).exp_().unsqueeze(-1)
    return ((out_a * w_a + out_b * w_b) / (w_a + w_b)).to(out_a.dtype)


def masked_sdpa(query, key, value, mask, scaling: float | None) -> torch.Tensor:
    """torch's SDPA under an explicit mask with grouped K/V heads read in place. -> (B, q, heads, d)

    transformers copies every K/V head group out (repeat_kv) whenever a mask is given; ``enable_gqa`` makes
    the same call without the copies (7 query heads per K/V head on Qwen2.5-0.5B).
    """
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """softmax(QK^T * scaling + mask) of query rows over grouped K/V heads read in place.

    query: (B, heads, q, d); key: (B, kv_heads, K, d); mask: additive (B, 1, q, K) or None.
    Returns (B, kv_heads, group, q, K): query head g*group + j is [:, g, j].
    """
    b, n_heads, q_len, d = query.shape
    kv_heads, n_k = key.shape[1], key.shape[2]
    group = n_heads // kv_heads  # query heads g*group .. g*group+group-1 read K/V head g (transformers' repeat_kv)
    # Scaled before the product: the question's rows are far fewer than the (rows, K) logits.
    q = query.reshape(b, kv_heads, group * q_len, d) * scaling
    logits = (q @ key.transpose(-1, -2)).view(b, kv_heads, group, q_len, n_k)
    if mask is not None:
        logits += mask[:, :, None]  # (B, 1, 1, q, K) over every head of a group
    return logits.softmax(dim=-1)


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    mask: torch.Tensor | None,
    scaling: float,
    n_keys: int = 0,
    heads: str = "mean",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Attention of a few query rows on the compiled kernel (:mod:`.few_row_attention`), or where it does not apply
    as two plain matmuls, grouped K/V heads read in place; with ``n_keys``, also the attention norm of the first
    ``n_keys`` keys from the same probabilities (InfoFlow's score):
    s[k] = || mean_heads softmax(QK^T * scaling + mask)[:, k] ||_2 over query rows, or with ``heads="max"``
    the max over heads of each head's || softmax(...)[:, k] ||_2.

    query: (B, heads, q, d); key/value: (B, kv_heads, K, d); mask: additive (B, 1, q, K) or None.
    Returns the output (B, q, heads, d) like transformers' attention functions (None without ``value``) and
    the scores (n_keys,) float32 (None without ``n_keys``). Not SDPA: for a question's few rows over thousands
    of keys torch's CPU flash kernel ran at ~11 GFLOP/s (13 rows x 4K keys, SmolLM2), far below what two
    matmuls that read K and V once reach.
    """
    b, n_heads, q_len, d = query.shape
    if n_keys and b != 1:  # a scoring forward is one prompt; scores over a batch would mix prompts
        raise ValueError(f"attention scores need a batch of 1 prompt, got {b}; score each prompt alone")
    sq = torch.zeros(n_heads if heads == "max" else 1, n_keys) if n_keys else None
    on_kernel = few_row_attention(query, key, value, mask, scaling, n_keys) if q_len <= QUERY_CHUNK else None
    if on_kernel is not None:
        output, probs = on_kernel  # probs: (kv_heads, group, q, n_keys)
        if sq is not None:
            _add_squared_norms(sq, probs.reshape(n_heads, q_len, n_keys), heads)
        return output, None if sq is None else sq.sqrt().max(dim=0).values
    kv_heads, n_k = key.shape[1], key.shape[2]
    group = n_heads // kv_heads  # query heads g*group .. g*group+group-1 read K/V head g (transformers' repeat_kv)
    out = None if value is None else query.new_empty(b, kv_heads, group, q_len, d)
    for start in range(0, q_len, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, q_len)
        rows = stop - start
        rows_mask = None if mask is None else mask[:, :, start:stop]
        probs = attention_probabilities(query[:, :, start:stop], key, rows_mask, scaling)  # (B, kv, group, rows, K)
        if out is not None:
            out[:, :, :, start:stop] = (probs.view(b, kv_heads, group * rows, n_k) @ value).view(
                b, kv_heads, group, rows, d
            )
        if sq is not None:
            _add_squared_norms(sq, probs[0, ..., :n_keys].reshape(n_heads, rows, n_keys).float(), heads)
    output = None if out is None else out.view(b, n_heads, q_len, d).transpose(1, 2)
    return output, None if sq is None else sq.sqrt().max(dim=0).values


def _add_squared_norms(sq: torch.Tensor, per_head: torch.Tensor, heads: str) -> None:
    """sq (1 or heads, n_keys) += the squared norm over query rows of per_head (heads, rows, n_keys), its heads
    averaged first for ``heads="mean"``."""
    if heads == "mean":
        per_head = per_head.mean(dim=0, keepdim=True)  # (1, rows, n_keys)
    sq += per_head.pow(2).sum(dim=1)


def infoflow_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    c, plan = _active.get(), _sparse.get()
    layer = getattr(module, "layer_idx", None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    want = last_layer.wanted(layer)
    if want is last_layer.Wanted.KEYS_VALUES:  # the layer's K/V are in the cache: all the caller reads
        raise StopForward
    if c is not None:  # a scoring forward, which stops after c.stop_after
        if layer == c.stop_after and c.stop_before_attention:
            raise StopForward
        scored, last = layer in c.score_layers, layer == c.stop_after
        # A question's few rows: one probability block, where plain matmuls beat the flash kernel. CacheBlend's
        # check pass runs under a plan, which gives no mask: its rows, few or many, take the plan's path below.
        few = query.shape[2] <= QUERY_CHUNK and plan is None
        out = None
        if scored or (few and not last):
            wanted = value if few and not last else None  # the last layer's output is never used
            out, s = grouped_attention(query, key, wanted, attention_mask, scale, c.n_keys if scored else 0, c.heads)
            if scored:
                c.scores = s if c.scores is None else c.scores + s
                c.layers_seen.append(layer)
        if last:
            raise StopForward
        if out is not None:
            return out, None
    if plan is not None:  # no mask was made (infoflow_mask): the plan's positions say what each query sees
        if query.shape[2] != plan.input_positions.numel():
            raise RuntimeError(
                f"{query.shape[2]} queries under a plan of {plan.input_positions.numel()} positions: run the plan's "
                "queries, one per position, or the forward outside sparse_queries (no mask is made within it)"
            )
        out = _sorted_queries(query, key, value, plan.input_positions, scale, want)  # the compiled kernel
        if out is None:  # inference: no dropout
            out, _ = chunked_attention(query, key, value, plan, scaling=scaling)
        return out, None
    # A causal forward with nothing cached (full prefill) is the sparse case with every position a query; the kernel
    # beats SDPA's causal kernel there too (README, "The recompute's attention kernel").
    causal_from_start = attention_mask is None and getattr(module, "is_causal", True) and not dropout
    if causal_from_start and 1 < query.shape[2] == key.shape[2]:
        out = _sorted_queries(query, key, value, torch.arange(query.shape[2]), scale, want)
        if out is not None:
            return out, None
    if attention_mask is not None and query.shape[2] > 1:  # prefill, teacher forcing: explicit masks
        return masked_sdpa(query, key, value, attention_mask, scaling), None
    if attention_mask is None and not dropout:  # a decoding step: one row sees the whole cache
        out = decode_attention(query, key, value, scale)  # the compiled kernel, where it runs
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _sorted_queries(query, key, value, positions: torch.Tensor, scale: float, want: last_layer.Wanted | None):
    """:func:`.sparse_attention` of queries at ``positions`` (Q,), or None where the kernel does not run. Where only
    the last row is wanted, only it is computed, the others stand in as views of it (the layer's hooks drop them).
    -> (B, Q, heads, d)"""
    if want is not last_layer.Wanted.LAST_ROW:
        return sparse_attention(query, key, value, positions, scale)
    out = sparse_attention(query[:, :, -1:], key, value, positions[-1:], scale)  # (B, 1, heads, d)
    return None if out is None else out.expand(-1, query.shape[2], -1, -1)


def infoflow_mask(*args, **kwargs) -> torch.Tensor | None:
    """The mask transformers makes for a forward given none: SDPA's, but none under a sparse-query plan, whose
    positions say what each query sees. A (Q, M) float mask there would take 4 bytes a query and key: 39 MB for a
    15 % recompute at 8K on SmolLM2, 251 MB for CacheBlend's check pass over the same context (README, "CacheBlend's
    check pass")."""
    return None if _sparse.get() is not None else sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register the attention function and its mask function (without the latter the mask silently becomes None)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, infoflow_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, infoflow_mask)
    return ATTN_IMPLEMENTATION
