"""How many FLOPs each path of a query costs, from the model's shape alone: the ceiling a method's speedup can reach.

Counted per decoder layer, multiply-adds as 2 FLOPs:
- projections and MLP, per token that runs the layer: q, k, v, o and the gated MLP's three matrices;
- attention, per query: QK^T and PV over the keys it sees (its *visible* count: every cache entry at a position
  <= its own), so a token recomputed late in the context costs more than one recomputed early;
- the LM head once (only the last position's logits are needed for the first token), and in full prefill and the
  recompute the last layer's attention, o and MLP for the last position alone (its q, k and v for every token:
  ``engine/last_layer.py``).
Norms, RoPE, softmax and biases are left out: under 1 % of the total on the registered models.

The ceiling speedup of a method is full prefill's FLOPs over its scoring plus recompute FLOPs: what it would
reach if every path ran at full prefill's FLOP rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int  # gated MLP width
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> ModelShape:
        """From a transformers decoder config (Llama, Qwen2 and the like)."""
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
        )

    @property
    def kv_flops(self) -> int:
        """The k and v projections of one token in one layer."""
        return 2 * 2 * self.hidden * self.kv_heads * self.head_dim

    @property
    def qkv_flops(self) -> int:
        return self.kv_flops + 2 * self.hidden * self.heads * self.head_dim

    @property
    def token_layer_flops(self) -> int:
        """Projections (q, k, v, o) and MLP of one token through one layer."""
        o_proj = 2 * self.heads * self.head_dim * self.hidden
        return self.qkv_flops + o_proj + 2 * 3 * self.hidden * self.intermediate

    @property
    def key_layer_flops(self) -> int:
        """Attention of one query to one visible key in one layer: a QK^T and a PV dot product per head."""
        return 2 * 2 * self.heads * self.head_dim

    @property
    def head_flops(self) -> int:
        return 2 * self.hidden * self.vocab


def forward_flops(shape: ModelShape, visible: torch.Tensor, layers: int) -> float:
    """FLOPs of running tokens through the first ``layers`` layers, each seeing ``visible[i]`` keys.

    visible: (q,) key count per query.
    """
    keys = float(visible.double().sum())
    return layers * (visible.numel() * shape.token_layer_flops + keys * shape.key_layer_flops)


def first_token_flops(shape: ModelShape, visible: torch.Tensor) -> float:
    """A forward whose caller reads the last token's logits alone: every layer but the last for every token, the last
    layer's q, k and v for every token and the rest for the token that sees the most keys (the last), the LM head once.

    visible: (q,) key count per query.
    """
    last_token = shape.token_layer_flops - shape.qkv_flops + float(visible.max()) * shape.key_layer_flops
    body = forward_flops(shape, visible, layers=shape.layers - 1) + visible.numel() * shape.qkv_flops
    return body + last_token + shape.head_flops


def full_prefill_flops(shape: ModelShape, n_tokens: int) -> float:
    """The whole prompt in one causal forward: the token at position i sees i + 1 keys."""
    return first_token_flops(shape, torch.arange(1, n_tokens + 1))


def recompute_flops(shape: ModelShape, input_positions: torch.Tensor) -> float:
    """Selected and fresh tokens through every layer at their global positions.

    input_positions: (q,) prompt positions of the tokens that run. Every prompt position holds one cache
    entry, so the token at position p sees p + 1 keys.
    """
    return first_token_flops(shape, input_positions + 1)


def infoflow_scoring_flops(shape: ModelShape, n_queries: int, n_context: int, score_layers: list[int]) -> float:
    """The question rows over the whole context up to the last scoring layer L: layers 0..L-1 whole (a scoring
    layer's norm comes from the probabilities its attention computes anyway), and layer L's q, k, v and QK^T
    (the forward stops once its scores are taken)."""
    visible = n_context + torch.arange(1, n_queries + 1)  # (q,) the context, then the question causally
    last = max(score_layers)
    last_scores = float(visible.double().sum()) * shape.key_layer_flops // 2
    return forward_flops(shape, visible, layers=last) + n_queries * shape.qkv_flops + last_scores


def cacheblend_scoring_flops(shape: ModelShape, n_prefix: int, n_context: int, check_layer: int) -> float:
    """Every context token after the prefix through layers 0..check_layer-1, causally, then the check layer's
    k and v: CacheBlend's fresh K/V to compare with the cache."""
    tokens = n_context - n_prefix
    return forward_flops(shape, torch.arange(n_prefix + 1, n_context + 1), layers=check_layer) + tokens * shape.kv_flops


@dataclass(frozen=True)
class Cost:
    """One method's work at one context, next to full prefill's, and the ceiling speedup it implies."""

    full_flops: float
    scoring_flops: float
    recompute_flops: float
    mean_relative_position: float  # of the recomputed context tokens: 0 = start of the prompt, 1 = its end

    @property
    def ceiling(self) -> float:
        return self.full_flops / (self.scoring_flops + self.recompute_flops)


def mean_relative_position(selected_positions: torch.Tensor, n_tokens: int) -> float:
    if selected_positions.numel() == 0:
        return float("nan")
    return float(selected_positions.double().mean()) / max(1, n_tokens - 1)
