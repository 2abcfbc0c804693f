"""Which cached tokens to recompute: one small class per method behind a name -> class registry.

A selector sees the placed context and a :class:`Probe` that runs the model passes some methods need
(question attention for InfoFlow, one early layer for CacheBlend). It knows nothing of storage.
Every selector returns exactly ``budget`` candidate indices, sorted by position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..registry import Registry
from .attention import HEAD_REDUCTIONS
from .placement import PlacedContext

DEFAULT_RATIO = 0.15


@dataclass
class Probe:
    """Lazily computed model signals over the placed tokens, each at most once per query."""

    question_scores: Callable[[list[int], str], torch.Tensor]  # layers, head reduction -> (N,) InfoFlow score
    layer_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer -> fresh K, V (kv_heads, N - p, d)
    _memo: dict = field(default_factory=dict)

    def scores(self, layers: list[int], heads: str = "mean") -> torch.Tensor:
        key = ("scores", tuple(layers), heads)
        if key not in self._memo:
            self._memo[key] = self.question_scores(layers, heads)
        return self._memo[key]

    def fresh_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("kv", layer)
        if key not in self._memo:
            self._memo[key] = self.layer_kv(layer)
        return self._memo[key]


def ratio_budget(placed: PlacedContext, ratio: float) -> int:
    """n = max(1, int(ratio * T)) with T the cached passage tokens, capped by what may be selected.

    ``ratio`` is in (0, 1]: :class:`~infoflow_rag.engine.options.QueryOptions` checked it."""
    n = max(1, int(ratio * placed.n_passage_tokens))
    return min(n, int(placed.candidate.sum()))


def top_candidates(values: torch.Tensor, candidate: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the ``budget`` largest values among candidates, sorted by position."""
    masked = values.float().masked_fill(~candidate, float("-inf"))
    return masked.topk(budget).indices.sort().values


class Selector(ABC):
    name: ClassVar[str]
    fixed_ratio: ClassVar[float | None] = None  # the share it always recomputes, whatever the ratio (full, none)

    def budget(self, placed: PlacedContext, ratio: float) -> int:
        return ratio_budget(placed, ratio)

    @abstractmethod
    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        """(budget,) int64 indices into the placed tokens, sorted."""


SELECTORS: Registry[Selector] = Registry("selector", "selectors")
register = SELECTORS.register
validate_selector = SELECTORS.validate
make_selector = SELECTORS.make


def default_score_layers(num_layers: int) -> list[int]:
    """4 late layers at the published relative depth (22-25 of 28), e.g. 24-27 of 30."""
    start = max(0, min(round(num_layers * 22 / 28), num_layers - 4))
    return list(range(start, min(start + 4, num_layers)))


@register
class InfoFlowSelector(Selector):
    """Tokens the question attends to most (attention norm over question tokens, mean over scoring layers)."""

    name = "infoflow"

    def __init__(self, layers: list[int] | None = None, heads: str = "mean"):
        if heads not in HEAD_REDUCTIONS:
            raise ValueError(f"unknown heads {heads!r}; choose one of {', '.join(HEAD_REDUCTIONS)} (mean: published)")
        if layers is not None and not layers:
            raise ValueError("layers is empty; give the scoring layers, e.g. [20, 21, 22, 23], or omit it")
        self.layers = layers  # None: default_score_layers of the model, filled by the engine
        self.heads = heads

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        if self.layers is None:
            raise ValueError("InfoFlowSelector.layers is unset: the engine fills it from the model depth")
        return top_candidates(probe.scores(self.layers, self.heads), placed.candidate, budget)


def recomputable_passages(placed: PlacedContext) -> list[tuple[int, int, int]]:
    """(passage index, start, end) into the placed tokens of every passage that may be recomputed (exact
    passages, such as the first one when it is cached at its own positions, are not)."""
    return [(p, start, end) for p, start, end in placed.spans if bool(placed.candidate[start:end].all())]


def recomputable_spans(placed: PlacedContext) -> list[tuple[int, int]]:
    """(start, end) of every passage that may be recomputed."""
    return [(start, end) for _, start, end in recomputable_passages(placed)]


def passage_heads(placed: PlacedContext, k: int | Callable[[int], int]) -> torch.Tensor:
    """Indices of the first ``k`` tokens (or ``k(passage length)``) of every passage that may be recomputed,
    round-robin: every passage's first token, then every passage's second, ... so a budget cut short still
    reaches them all."""
    count = k if callable(k) else lambda _: k
    heads = [
        (offset, start + offset)
        for start, end in recomputable_spans(placed)
        for offset in range(min(count(end - start), end - start))
    ]
    return torch.tensor([index for _, index in sorted(heads)], dtype=torch.long)


@register
class SinkFlowSelector(InfoFlowSelector):
    """The first ``sink`` tokens of every recomputed passage, then the tokens the question attends to most.

    A passage prefilled alone behind the prompt head opened with a left context that is gone at query time,
    so its first tokens carry the most stale attention-sink mass (EPIC's repair); InfoFlow's question
    attention finds the tokens that carry the answer. The sink tokens come first (in passage order, while
    the budget lasts), the rest of the budget goes to InfoFlow's ranking; the total is the same budget.
    """

    name = "sinkflow"

    def __init__(self, sink: int = 8, layers: list[int] | None = None, heads: str = "mean"):
        super().__init__(layers, heads)
        if sink < 0:
            raise ValueError(f"sinkflow sink must be >= 0 tokens per passage (0 is plain InfoFlow), got {sink}")
        self.sink = sink

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        first = passage_heads(placed, self.sink)[:budget]  # (≤ budget,)
        if budget == first.numel():
            return first.sort().values
        rest = placed.candidate.clone()
        rest[first] = False
        if self.layers is None:
            raise ValueError("SinkFlowSelector.layers is unset: the engine fills it from the model depth")
        picks = top_candidates(probe.scores(self.layers, self.heads), rest, budget - first.numel())
        return torch.cat([first, picks]).sort().values


def kv_deviation(placed: PlacedContext, probe: Probe, layer: int) -> torch.Tensor:
    """(N,) squared distance of each token's cached K and V from their full-context values at ``layer`` (the
    prefix, exact, is 0): how stale the cache is, CacheBlend's signal."""
    p = placed.prefix_len
    fresh_k, fresh_v = probe.fresh_kv(layer)  # (kv_heads, N - p, d)
    cached_k, cached_v = placed.keys[layer, :, p:], placed.values[layer, :, p:]
    deviation = (fresh_k - cached_k).pow(2).sum((0, 2)) + (fresh_v - cached_v).pow(2).sum((0, 2))  # (N - p,)
    return torch.cat([torch.zeros(p), deviation])


@register
class CacheBlendSelector(Selector):
    """Tokens whose K/V deviate most between cache and full-context prefill at the check layer."""

    name = "cacheblend"

    def __init__(self, check_layer: int = 1):
        self.check_layer = check_layer

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        return top_candidates(kv_deviation(placed, probe, self.check_layer), placed.candidate, budget)


@register
class EpicSelector(Selector):
    """The first tokens of every passage that needs recompute (LegoLink: the spurious attention sinks)."""

    name = "epic"

    def __init__(self, k: int | None = None):
        if k is not None and k < 1:
            raise ValueError(f"epic k must be >= 1 tokens per passage, got {k}")
        self.k = k  # None: split the ratio budget evenly over passages

    def budget(self, placed: PlacedContext, ratio: float) -> int:
        if self.k is None:
            return ratio_budget(placed, ratio)
        return sum(min(self.k, int(placed.candidate[s:e].sum())) for _, s, e in placed.spans)

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        spans = recomputable_spans(placed)
        quota = [0] * len(spans)
        remaining = budget
        while remaining > 0:  # round-robin, so a short passage's unused share flows to the others
            progressed = False
            for i, (s, e) in enumerate(spans):
                if remaining and quota[i] < e - s and (self.k is None or quota[i] < self.k):
                    quota[i] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                break
        return torch.cat(
            [torch.arange(s, s + q) for (s, _), q in zip(spans, quota, strict=True)]
            or [torch.empty(0, dtype=torch.long)]
        )


@register
class RandomSelector(Selector):
    """Uniformly random candidates, seeded: the floor any informed method must beat."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        noise = torch.rand(placed.token_ids.numel(), generator=torch.Generator().manual_seed(self.seed))
        return top_candidates(noise, placed.candidate, budget)


@register
class NoSelector(Selector):
    """Pure reuse: nothing recomputed."""

    name = "none"
    fixed_ratio = 0.0

    def budget(self, placed: PlacedContext, ratio: float) -> int:
        return 0

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        return torch.empty(0, dtype=torch.long)


@register
class FullSelector(Selector):
    """Every passage token recomputed (exact passages too): full prefill itself. The engine runs it as one causal
    forward over the whole prompt and places none of the passages' K/V (nothing cached is read), so as a method it
    costs what the reference costs; over a placed context with passages, it would select them all."""

    name = "full"
    fixed_ratio = 1.0

    def budget(self, placed: PlacedContext, ratio: float) -> int:
        return placed.n_passage_tokens

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        return torch.cat([torch.arange(s, e) for _, s, e in placed.spans] or [torch.empty(0, dtype=torch.long)])
