"""One query through the stages up to the first token: place (global RoPE) -> [reorder] -> score/select ->
recompute. What each stage does lives in its module; this one hands each stage the options it reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kv import PassageKV
from . import linears, recompute, reorder, scoring
from .compression import Policy, PromptMap, make_policy
from .options import QueryOptions
from .placement import Layout, PlacedContext, Segment, place
from .prefill import full_prefill
from .result import StageTimings
from .selection import InfoFlowSelector, Probe, Selector, make_selector

if TYPE_CHECKING:
    from .facade import Engine

Passage = str | PassageKV


@dataclass
class Prepared:
    """A query made ready to decode: the cache holds the whole prompt, ``out.logits`` the first token's.

    KV compression (``options.compress``) has not run yet: decoding runs it once the first token is out, so
    it never delays TTFT. :meth:`Engine.compress` runs it on demand (e.g. to inspect the decode cache).
    """

    layout: Layout
    placed: PlacedContext | None  # None for full prefill, which reads nothing cached and so places nothing
    chosen: torch.Tensor  # (s,) recomputed indices into the placed tokens
    options: QueryOptions
    out: recompute.Recomputed
    timings: StageTimings
    t0: float  # perf_counter at the call, for TTFT
    policy: Policy  # the KV compression policy decoding applies after the first token
    compressed: bool = False


@dataclass(frozen=True)
class Prompt:
    """The fresh parts of a prompt: ``slots`` (fresh token runs, None where a passage goes; empty: passages
    back to back) and ``tail`` (the question block), whose ``query`` rows score the context."""

    slots: list[torch.Tensor | None]
    tail: torch.Tensor
    query: slice


def selector_for(engine: Engine, options: QueryOptions) -> Selector:
    sel = make_selector(options.selector, **options.selector_options)
    if isinstance(sel, InfoFlowSelector):
        if sel.layers is None:
            sel.layers = engine.score_layers
        engine.check_layers(sel.layers)
    return sel


def run(
    engine: Engine, passages: list[Passage], prompt: Prompt, options: QueryOptions, t0: float, max_new_tokens: int
) -> Prepared:
    """Every stage up to the first token's logits, timed; the cache keeps room for ``max_new_tokens`` after the
    prompt."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (0: no room kept for the answer's K/V), got {max_new_tokens}")
    sel = selector_for(engine, options)
    policy = make_policy(options.compress, **options.compress_options)
    timings = StageTimings()
    segments = passage_segments(engine, passages, prefill=sel.name != "full", timings=timings, t0=t0)
    if options.reorder:
        t = time.perf_counter()
        with linears.products_in(options.score_dtype):  # its one forward is a question scoring pass
            segments = reorder.densest_last(engine, segments, prompt, options.ratio)
        timings.reorder = time.perf_counter() - t
    layout = engine.layout(segments, prompt)
    check_fits(layout.length, max_new_tokens, engine.max_positions)
    policy.check(PromptMap.from_layout(layout))
    if sel.name == "full":  # nothing cached is read: the reference, the whole prompt in one causal forward
        t = time.perf_counter()
        out = full_prefill(engine.model, layout.token_ids())
        timings.recompute = time.perf_counter() - t
        # Nothing placed either: the passages' K/V beside full prefill's own cache would cost time and memory.
        return Prepared(layout, None, torch.empty(0, dtype=torch.long), options, out, timings, t0, policy)

    t = time.perf_counter()
    placed = place(layout, engine.inv_freq, engine.model.dtype, "global", room=max_new_tokens)
    timings.place = time.perf_counter() - t
    # Scoring may use an ablation geometry; the recompute always runs in the global one.
    geometry = options.geometry
    scored = placed if geometry == "global" else place(layout, engine.inv_freq, engine.model.dtype, geometry)
    t = time.perf_counter()
    budget = sel.budget(placed, options.ratio)
    chosen = (
        sel.select(scored, budget, probe(engine, scored, layout, options.score_dtype))
        if budget
        else torch.empty(0, dtype=torch.long)
    )
    timings.score = time.perf_counter() - t

    t = time.perf_counter()
    out = recompute.recompute(engine.model, placed, chosen, *fresh_inputs(layout))
    timings.recompute = time.perf_counter() - t
    return Prepared(layout, placed, chosen, options, out, timings, t0, policy)


def fresh_inputs(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids (F,) and global positions (F,) of the segments that have no cached KV (question, template)."""
    fresh = [(s, seg) for s, seg in zip(layout.starts(), layout.segments, strict=True) if seg.kv is None]
    return torch.cat([seg.token_ids for _, seg in fresh]), torch.cat([s + torch.arange(len(seg)) for s, seg in fresh])


def check_fits(prompt_tokens: int, max_new_tokens: int, window: int) -> None:
    """Refuse a query that does not fit the context window, naming what overflows and the fix."""
    if prompt_tokens + max_new_tokens <= window:
        return
    if prompt_tokens >= window:
        raise ValueError(
            f"the prompt alone is {prompt_tokens} tokens, which leaves no room for an answer in the {window}-token "
            "context window; pass fewer or shorter passages"
        )
    raise ValueError(
        f"prompt of {prompt_tokens} tokens + max_new_tokens={max_new_tokens} exceeds the {window}-token context "
        f"window: the prompt fits, the answer does not; ask for at most max_new_tokens={window - prompt_tokens}, "
        "or pass fewer or shorter passages"
    )


def passage_segments(
    engine: Engine, passages: list[Passage], prefill: bool, timings: StageTimings, t0: float
) -> list[Segment]:
    """One segment per passage; text passages are prefilled here, unless they will be computed fresh anyway."""
    kvs: list[PassageKV | None] = [p if isinstance(p, PassageKV) else None for p in passages]
    texts = [i for i, p in enumerate(passages) if isinstance(p, str)]
    if texts and prefill:
        for i, kv in zip(texts, engine.prefill([passages[i] for i in texts]), strict=True):
            kvs[i] = kv
        timings.prefill = time.perf_counter() - t0
    segments = []
    for i, kv in enumerate(kvs):
        if kv is not None and (problem := engine.kv_problem(kv, kv.token_ids.tolist(), stored=False)) is not None:
            raise ValueError(
                f"passage {i} cannot be served from its KV: {problem}; it comes from another model or "
                "prompt format: prefill it again"
            )
        ids = kv.token_ids if kv is not None else torch.tensor(engine.passage_ids(passages[i]))
        segments.append(Segment(ids, kv, passage=i))
    return segments


def probe(engine: Engine, placed: PlacedContext, layout: Layout, score_dtype: str) -> Probe:
    """The scoring passes a selector may ask for: the question's attention (its linear layers on ``score_dtype``
    weights) and CacheBlend's fresh K/V at one layer (float32, as published)."""

    def question_scores(layers: list[int], heads: str) -> torch.Tensor:
        with linears.products_in(score_dtype):
            return scoring.question_attention_scores(engine.model, placed, layout.query_ids, layers, heads)

    return Probe(
        question_scores=question_scores, layer_kv=lambda layer: scoring.fresh_layer_kv(engine.model, placed, layer)
    )
