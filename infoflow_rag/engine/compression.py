"""KV compression after recompute: keep a budget of context tokens for decoding, evict the rest.

place -> score/select -> recompute -> first token -> **compress** -> decode. The first answer token comes
from the recompute forward over the whole prompt, and is out before compression runs (so compression never
adds to TTFT); compression shrinks what every later token attends to and what the cache holds while decoding.

Always kept: the fixed prefix (the attention sink) and every token that is not passage context (the
question block, the prompt template, text between passages of a framework prompt). Only passage tokens
compete for the budget.

One set of kept tokens is shared by all layers, because (1) InfoKV's entropy and layer-evolution signals
are one number per token, not per layer; (2) the cache stays rectangular, so every layer holds the same
entries and any attention backend decodes it unchanged; (3) the memory saved is then exactly the share of
tokens evicted. Per-layer or per-head budgets (SnapKV's original form) could keep what each layer reads
best; that is not done here.

The attention signal is the engine's own scoring pass (the attention norm of :mod:`attention`), run for
the last ``window`` prompt tokens over the recomputed cache, averaged over every layer, then max-pooled
over ``kernel`` neighbouring tokens as in SnapKV, so a kept token keeps its immediate context.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from ..registry import Registry
from .cache import stacked
from .placement import Layout
from .recompute import Recomputed
from .scoring import attention_scores
from .signals import SIGNALS

DEFAULT_WINDOW = 32  # observation window: the last prompt tokens, SnapKV's default size
DEFAULT_KERNEL = 7  # max-pool width over neighbouring context tokens, SnapKV's default


@dataclass
class PromptMap:
    """Per prompt position (0 .. L-1): its token, whether it is passage context, and its stored signals."""

    token_ids: torch.Tensor  # (L,) int64
    context: torch.Tensor  # (L,) bool: a passage token (may be evicted)
    signals: dict[str, torch.Tensor]  # name -> (L,) float32, NaN where the token has no stored signal

    @classmethod
    def from_layout(cls, layout: Layout) -> PromptMap:
        ids = torch.cat([layout.prefix.token_ids, *(seg.token_ids for seg in layout.segments)])
        context = torch.zeros(len(ids), dtype=torch.bool)
        signals = {name: torch.full((len(ids),), math.nan) for name in SIGNALS}
        for start, seg in zip(layout.starts(), layout.segments, strict=True):
            end = start + len(seg)
            context[start:end] = seg.passage is not None
            for name, values in (seg.kv.signals if seg.kv is not None else {}).items():
                if name in signals:
                    signals[name][start:end] = values.float()
        return cls(ids, context, signals)


@dataclass
class ContextView:
    """The passage tokens competing for the budget, in prompt order, and what policies rank them by."""

    positions: torch.Tensor  # (C,) prompt positions
    attention: torch.Tensor  # (C,) pooled attention of the observation window
    signals: dict[str, torch.Tensor]  # name -> (C,), NaN where a token carries no stored signal


class Policy(ABC):
    name: ClassVar[str]

    def __init__(self, window: int = DEFAULT_WINDOW, kernel: int = DEFAULT_KERNEL):
        if window < 1:
            raise ValueError(f"window must be >= 1 prompt token, got {window}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number of tokens, got {kernel}")
        self.window, self.kernel = window, kernel

    def keep_count(self, keep: float | int, n_context: int) -> int:
        """How many of ``n_context`` passage tokens stay: ``keep`` is a ratio (float) or a count (int)."""
        return min(keep, n_context) if isinstance(keep, int) else max(1, int(keep * n_context))

    def pool(self, attention: torch.Tensor) -> torch.Tensor:
        """(C,) -> (C,) max over ``kernel`` neighbours."""
        pad = self.kernel // 2
        return torch.nn.functional.max_pool1d(attention[None, None], self.kernel, 1, pad)[0, 0]

    @property
    def needs_signals(self) -> bool:
        """Whether ranking reads the per-token signals recorded at passage prefill (see :mod:`.signals`)."""
        return False

    def check(self, prompt: PromptMap) -> None:
        """Raise ValueError if this policy cannot rank ``prompt``: called before the query runs, so a bad
        combination fails at once instead of after the first token. Every ranking works by default."""
        return None

    @abstractmethod
    def rank(self, view: ContextView) -> torch.Tensor:
        """(C,) float: the higher, the more a token deserves to stay."""


POLICIES: Registry[Policy] = Registry("compression policy", "policies")
register = POLICIES.register
validate_policy = POLICIES.validate
make_policy = POLICIES.make


@register
class NoCompression(Policy):
    """Keep every token: the reference."""

    name = "none"

    def keep_count(self, keep: float | int, n_context: int) -> int:
        return n_context

    def rank(self, view: ContextView) -> torch.Tensor:
        return torch.zeros(len(view.positions))


@register
class SnapKV(Policy):
    """Attention of the observation window to each context token, pooled over neighbours, top-k."""

    name = "snapkv"

    def rank(self, view: ContextView) -> torch.Tensor:
        return self.pool(view.attention)


@register
class InfoKV(Policy):
    """w_a * rank(pooled attention) + w_e * rank(entropy) + w_v * rank(layer evolution), each rank in [0, 1].

    Ranks, not raw values, make the three signals commensurable whatever their scales. With
    ``entropy=0, evolution=0`` it keeps exactly what SnapKV keeps. High predictive entropy and
    large layer-to-layer change both count for a token (the paper's "forward influence").
    """

    name = "infokv"

    def __init__(
        self,
        attention: float = 0.5,
        entropy: float = 0.3,
        evolution: float = 0.2,
        window: int = DEFAULT_WINDOW,
        kernel: int = DEFAULT_KERNEL,
    ):
        super().__init__(window, kernel)
        self.weights = {"attention": attention, "entropy": entropy, "evolution": evolution}
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError(f"infokv weights must be >= 0 and not all 0, got {self.weights}")

    @property
    def needs_signals(self) -> bool:
        return any(self.weights[name] for name in SIGNALS)

    def check(self, prompt: PromptMap) -> None:
        for name in SIGNALS:
            if self.weights[name] and prompt.signals[name][prompt.context].isnan().any():
                raise ValueError(
                    f"infokv needs the {name!r} signal of every passage token, recorded at prefill; some passages "
                    "have none (computed fresh with selector='full', or stored before signals existed): prefill "
                    f"them again, or set {name}=0 in compress_options, or use compress='snapkv'"
                )

    def rank(self, view: ContextView) -> torch.Tensor:
        total = self.weights["attention"] * _percentile(self.pool(view.attention))
        for name in SIGNALS:
            if self.weights[name]:
                total = total + self.weights[name] * _percentile(view.signals[name])
        return total


def _percentile(values: torch.Tensor) -> torch.Tensor:
    """(C,) -> (C,) share of the other values below each one, in [0, 1]; equal values share a rank.

    Shared ranks matter: pooling makes runs of equal attention, and a tie must stay a tie in the blend.
    """
    below = torch.searchsorted(values.sort().values, values, right=False).float()
    return below / max(len(values) - 1, 1)


@torch.inference_mode()
def compress_cache(
    model: PreTrainedModel, out: Recomputed, prompt: PromptMap, policy: Policy, keep: float | int
) -> Recomputed:
    """``out`` with its cache cut to the kept entries (the same ones in every layer); unchanged if all stay."""
    context_pos = prompt.context.nonzero()[:, 0]  # (C,) ascending
    count = policy.keep_count(keep, len(context_pos))
    if count >= len(context_pos):
        return out
    view = ContextView(
        context_pos,
        _window_attention(model, out, prompt, policy.window)[context_pos],
        {name: s[context_pos] for name, s in prompt.signals.items()},
    )
    kept = torch.zeros(len(prompt.token_ids), dtype=torch.bool)
    kept[~prompt.context] = True
    # A stable sort breaks ties by position, so equal ranks keep the same tokens under every policy.
    order = policy.rank(view).sort(descending=True, stable=True).indices
    kept[context_pos[order[:count]]] = True
    entries = kept[out.positions].nonzero()[:, 0]  # (M',) cache order
    for layer in out.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, entries], layer.values[:, :, entries]
    return Recomputed(out.logits, out.cache, out.next_position, out.positions[entries])


def _window_attention(model: PreTrainedModel, out: Recomputed, prompt: PromptMap, window: int) -> torch.Tensor:
    """(L,) attention norm of the last ``window`` prompt tokens on every earlier entry, by prompt position.

    The window never reaches into passage context: it is cut at the last passage token.
    """
    length = len(prompt.token_ids)
    last_context = int(prompt.context.nonzero().max())
    start = max(length - window, last_context + 1)
    seen = (out.positions < start).nonzero()[:, 0]  # cache entries the window attends to
    keys, values = stacked(out.cache)  # (layers, 1, kv_heads, M, head_dim)
    layers = list(range(len(out.cache.layers)))
    scores = attention_scores(
        model, keys[:, 0, :, seen], values[:, 0, :, seen], prompt.token_ids[start:], torch.arange(start, length), layers
    )
    by_position = torch.zeros(length)
    by_position[out.positions[seen]] = scores
    return by_position
