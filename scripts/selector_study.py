"""Selector study on the development slice: which tokens to recompute to stay closest to full prefill.

HotpotQA dev questions START..START+N-1 (the development slice 0-999 only), qwen2.5-0.5b by default. Per
question, full prefill's greedy answer is the reference; every candidate rule prepares its cache (place,
score, select, recompute at the same token budget) and is teacher-forced along that answer and the gold
answer (see infoflow_rag.eval.fidelity): kl_first, kl_answer, top1, gold_nll, the prepare time (what TTFT
is made of) and the mean relative position of its picks. No decoding per candidate, so a candidate costs a
prepare and two short forwards. One JSON line per (question, candidate); a rerun skips what is on file, so
candidates can be added to a finished run. ``--summary`` prints the table, each candidate paired with
``infoflow`` on kl_answer.

    .venv/bin/python scripts/selector_study.py --questions 40 --out docs/selector-study.jsonl
    .venv/bin/python scripts/selector_study.py --out docs/selector-study.jsonl --summary

Candidates that are not library selectors are defined here; the ``sink{k}+infoflow`` rows run the library's
``sinkflow`` selector with ``sink=k``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from infoflow_rag.engine import Engine, attention, query, recompute, scoring
from infoflow_rag.engine.lead_in import NEUTRAL_LEAD_IN
from infoflow_rag.engine.placement import Layout, PlacedContext, rotate_keys
from infoflow_rag.engine.query import Prepared
from infoflow_rag.engine.selection import (
    InfoFlowSelector,
    Probe,
    SinkFlowSelector,
    kv_deviation,
    passage_heads,
    recomputable_spans,
    register,
    top_candidates,
)
from infoflow_rag.eval import fidelity
from infoflow_rag.eval.datasets import EvalExample, load_hotpotqa
from infoflow_rag.eval.kl_mass import AnswerPositions, kl_mass_table
from infoflow_rag.eval.results import drop_partial_line, read_json_lines
from infoflow_rag.eval.runner import DEFAULT_PROMPT
from infoflow_rag.eval.stats import Estimate, log_kl_diff, mean_ci, paired_diff, shared_ids
from infoflow_rag.kv import PassageKV
from infoflow_rag.models import LoadedModel

LADDER = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
DEV_END = 1000  # questions from 1000 on are held out; from 5000 on reserved for independent checks
MAX_NEW_TOKENS = 32
CALIBRATION_FIT = "runs/stale-calibration-qwen2.5-0.5b.pt"  # scripts/stale_calibration.py --fit-out, questions 0-31


@register
class DeviationInfoFlow(InfoFlowSelector):
    """Question attention times K/V staleness: to first order, a stale token moves the question's output by
    its attention weight times the error of its value, so rank by the product. Staleness is CacheBlend's
    (cached vs fresh K/V at the check layer)."""

    name = "study-deviation-infoflow"

    def __init__(self, check_layer: int = 1, layers: list[int] | None = None):
        super().__init__(layers)
        self.check_layer = check_layer

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        staleness = kv_deviation(placed, probe, self.check_layer).sqrt()  # the K/V error, not its square
        return top_candidates(probe.scores(self.layers) * staleness, placed.candidate, budget)


@register
class SinkShareInfoFlow(InfoFlowSelector):
    """sinkflow with each passage's sink tokens a share of that passage's part of the budget (``share`` x budget x
    passage length / context length) instead of a fixed count: a long passage gets a longer repaired head, as
    under EPIC, whose whole budget goes to passage heads (share 1)."""

    name = "study-sinkshare"

    def __init__(self, share: float = 0.5, layers: list[int] | None = None):
        super().__init__(layers)
        self.share = share

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        total = sum(end - start for start, end in recomputable_spans(placed)) or 1
        first = passage_heads(placed, lambda n: round(self.share * budget * n / total))[:budget]
        rest = placed.candidate.clone()
        rest[first] = False
        picks = top_candidates(probe.scores(self.layers), rest, budget - first.numel())
        return torch.cat([first, picks]).sort().values


@register
class PassageInfoFlow(InfoFlowSelector):
    """Two stages: whole passages in order of the question's mean attention per token, while they fit the budget
    (a recomputed passage is exact given what precedes it), then InfoFlow's picks for what is left."""

    name = "study-passages"

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        scores = probe.scores(self.layers)
        chosen, left = [], budget
        for start, end in sorted(recomputable_spans(placed), key=lambda se: -float(scores[se[0] : se[1]].mean())):
            if end - start <= left:
                chosen.append(torch.arange(start, end))
                left -= end - start
        whole = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)
        rest = placed.candidate.clone()
        rest[whole] = False
        return torch.cat([whole, top_candidates(scores, rest, left)]).sort().values


@register
class RepairedSinkFlow(SinkFlowSelector):
    """sinkflow with InfoFlow's question attention measured after the sink tokens are recomputed. Stale sinks
    draw the question's attention in the cached context, so scores taken over the unrepaired cache may misrank
    the other tokens. Study only: the sink tokens run twice (here, then in the joint recompute), which a shipped
    rule would avoid by recomputing the rest on top of them."""

    name = "study-repaired-sinkflow"

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        first = passage_heads(placed, self.sink)[:budget]  # (≤ budget,)
        if budget == first.numel():
            return first.sort().values
        probe.repair(first)  # writes the sinks' (and the fresh tokens') full-context K/V into the placed buffers
        return _first_then_ranked(placed, budget, first, probe.scores(self.layers, self.heads))


def _first_then_ranked(placed: PlacedContext, budget: int, first: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``first`` (≤ budget indices), then the top of ``scores`` (N,) among the other candidates. -> (budget,)"""
    rest = placed.candidate.clone()
    rest[first] = False
    return torch.cat([first, top_candidates(scores, rest, budget - first.numel())]).sort().values


TITLE_CAP = 16  # a passage whose first 16 tokens hold no colon has no title here: its first 8 tokens stand in


@register
class TitleSinkFlow(InfoFlowSelector):
    """sinkflow with the head tokens chosen by content (round 13): each passage opens with "{title}: ", so
    ``part="title"`` repairs the title and its colon, ``part="after"`` the ``k`` tokens right after the colon (early
    in the passage, but not the title); the rest of the budget by InfoFlow's score."""

    name = "study-title-sinkflow"

    def __init__(self, part: str = "title", k: int = 8, layers: list[int] | None = None):
        super().__init__(layers)
        if part not in ("title", "after"):
            raise ValueError(f"study-title-sinkflow part must be 'title' or 'after', got {part!r}")
        self.part, self.k = part, k

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        colon = probe.colon_ids()  # (c,) token ids whose text holds a colon
        heads = []
        for start, end in recomputable_spans(placed):
            opening = placed.token_ids[start : min(end, start + TITLE_CAP)]
            hits = torch.isin(opening, colon).nonzero()
            title_end = start + int(hits[0, 0]) + 1 if hits.numel() else start + min(8, end - start)
            part = (start, title_end) if self.part == "title" else (title_end, min(end, title_end + self.k))
            heads.extend(range(*part))
        first = torch.tensor(heads, dtype=torch.long)[:budget]
        return _first_then_ranked(placed, budget, first, probe.scores(self.layers))


@register
class LastRowsSinkFlow(SinkFlowSelector):
    """sinkflow scored by the rows nearest the answer: the whole question block after the passages runs (the
    instruction, the question, the chat template's turn end and the assistant header, as ``score_rows="block"``),
    and the attention norm is taken over its last ``rows`` rows only. The last row is the one the first answer
    token is drawn from."""

    name = "study-lastrows-sinkflow"

    def __init__(self, rows: int = 1, sink: int = 8, layers: list[int] | None = None):
        super().__init__(sink, layers)
        self.rows = rows

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        last_rows = Probe(question_scores=lambda layers, _: probe.last_row_scores(layers, self.rows), layer_kv=None)
        return super().select(placed, budget, last_rows)


@register
class ValueWeightedSinkFlow(SinkFlowSelector):
    """sinkflow (``sink=0``: InfoFlow) with each head's attention weighted by the key's value norm (round 12)."""

    name = "study-value-sinkflow"

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        weighted = Probe(question_scores=lambda layers, _: probe.value_scores(layers), layer_kv=None)
        return super().select(placed, budget, weighted)


@functools.cache
def _load_fit(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"k"|"v": (a (L, kv_heads), b (L, kv_heads, d))} as scripts/stale_calibration.py saved it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no fitted map at {path}: run scripts/stale_calibration.py --fit-out {path} first")
    return torch.load(path)


def calibrate_stale(placed: PlacedContext, fit: dict, inv_freq: torch.Tensor, parts: str = "kv") -> None:
    """In place: every stale (recomputable) token's K/V mapped by a fitted affine map per layer and K/V head,
    y = a * x + b, keys in the pre-RoPE frame: k' = a * k + R(p) b. Exact tokens (prefix, first passage) and fresh
    slots are not touched. Round 14."""
    if not placed.cached_first:
        raise ValueError("calibrate_stale needs the global geometry (the placed keys are views of the prompt's)")
    entries = placed.positions[placed.candidate]  # (S,) stale tokens' prompt positions
    (a_k, b_k), (a_v, b_v) = fit["k"], fit["v"]
    n_layers, kv_heads, d = b_k.shape
    offset_k = rotate_keys(b_k[:, :, None, :].expand(n_layers, kv_heads, entries.numel(), d), entries, inv_freq)
    keys, values = placed.prompt_keys, placed.prompt_values  # (L, kv_heads, M, d)
    if "k" in parts:
        keys[:, :, entries] = a_k[:, :, None, None] * keys[:, :, entries] + offset_k
    if "v" in parts:
        values[:, :, entries] = a_v[:, :, None, None] * values[:, :, entries] + b_v[:, :, None, :]


@register
class CalibratedSelector(InfoFlowSelector):
    """Round 14: the stale cache first moved by the fitted affine map (:func:`calibrate_stale`), then ``inner``'s
    picks on it ("none": nothing recomputed). The map costs a pass over the stale K/V, no model layer."""

    name = "study-calibrated"
    INNER = {"none": None, "sinkflow": SinkFlowSelector, "infoflow": InfoFlowSelector}

    def __init__(self, fit: str, inner: str = "sinkflow", parts: str = "kv", layers: list[int] | None = None):
        super().__init__(layers)
        if inner not in self.INNER:
            raise ValueError(f"study-calibrated inner must be one of {', '.join(self.INNER)}, got {inner!r}")
        if parts not in ("kv", "k", "v"):
            raise ValueError(f"study-calibrated parts must be 'kv', 'k' or 'v', got {parts!r}")
        self.fit, self.inner, self.parts = fit, inner, parts

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        calibrate_stale(placed, _load_fit(self.fit), probe.inv_freq, self.parts)
        inner = self.INNER[self.inner]
        if inner is None:
            return torch.empty(0, dtype=torch.long)
        return inner(layers=self.layers).select(placed, budget, probe)


def token_features(placed: PlacedContext, probe: Probe, layers: list[int], names: tuple[str, ...]) -> torch.Tensor:
    """(N, len(names)) per placed token (0 outside recomputable passages): InfoFlow's score, CacheBlend's layer-1
    deviation, whether it is among its passage's first 8 tokens, its offset and relative offset in the passage,
    the passage's mean score, and the passage's distance from the question (1: next to it). The logs are taken
    of x + a small floor (a zero score stays finite): oracle_ranker.py fits the ranker on these very columns."""
    score = probe.scores(layers).double()
    n = placed.token_ids.numel()
    columns = {name: torch.zeros(n, dtype=torch.float64) for name in names}
    spans = recomputable_spans(placed)
    for k, (start, end) in enumerate(spans):
        offset = torch.arange(end - start, dtype=torch.float64)
        parts = {
            "head8": (offset < 8).double(),
            "log1p off": offset.log1p(),
            "reloff": offset / max(end - start - 1, 1),
            "log passage rel": torch.full_like(offset, float((score[start:end].mean() + 1e-6).log())),
            "from_q": torch.full_like(offset, float(len(spans) - k)),
        }
        for name, values in parts.items():
            if name in columns:
                columns[name][start:end] = values
    if "log score" in columns:
        columns["log score"] = (score + 1e-6).log()
    if "log dev1" in columns:
        columns["log dev1"] = (kv_deviation(placed, probe, 1).double() + 1e-9).log()
    return torch.stack([columns[name] for name in names], dim=1)


@register
class RankerSelector(InfoFlowSelector):
    """A linear ranker over :func:`token_features`, its weights fitted (outside) to the round-8 effect oracle's
    picks on development questions."""

    name = "study-ranker"

    def __init__(self, weights: dict[str, float], layers: list[int] | None = None):
        super().__init__(layers)
        self.weights = weights

    def select(self, placed: PlacedContext, budget: int, probe: Probe) -> torch.Tensor:
        names = tuple(self.weights)
        features = token_features(placed, probe, self.layers, names)  # (N, F)
        value = features @ torch.tensor([self.weights[n] for n in names], dtype=torch.float64)
        return top_candidates(value, placed.candidate, budget)


_plain_probe = query.probe
_plain_grouped_attention = attention.grouped_attention
_score_rows: list[int | None] = [None]  # while a last-rows score runs: how many rows it is taken over
_value_norms: list[torch.Tensor] = []  # while a value-weighted score runs: (kv_heads, N) per scoring layer, in order


def _study_grouped_attention(query_, key, value, mask, scaling, n_keys=0, heads="mean"):
    """attention.grouped_attention, with the scores taken over the last ``_score_rows[0]`` query rows only, or
    each head's attention weighted by the key's value norm (``_value_norms``, one entry per scoring layer)."""
    if n_keys and _value_norms:
        out, _ = _plain_grouped_attention(query_, key, value, mask, scaling, 0, heads)
        return out, _value_weighted_scores(query_, key, mask, scaling, _value_norms.pop(0))
    rows = _score_rows[0]
    if not n_keys or rows is None:
        return _plain_grouped_attention(query_, key, value, mask, scaling, n_keys, heads)
    out, _ = _plain_grouped_attention(query_, key, value, mask, scaling, 0, heads)
    last_mask = None if mask is None else mask[:, :, -rows:]  # (B, 1, rows, K)
    _, scores = _plain_grouped_attention(query_[:, :, -rows:], key, None, last_mask, scaling, n_keys, heads)
    return out, scores


def _last_row_scores(engine: Engine, placed: PlacedContext, layout: Layout, layers: list[int], rows: int):
    """(N,) InfoFlow's score over the last ``rows`` rows of the fresh block after the passages, which runs whole."""
    ids, positions = query.fresh_inputs(layout)  # (F,), (F,)
    _score_rows[0] = rows
    try:
        block = dataclasses.replace(placed, query_positions=positions)
        return scoring.question_attention_scores(engine.model, block, ids, layers)
    finally:
        _score_rows[0] = None


def _value_weighted_scores(query_, key, mask, scaling: float, value_norm: torch.Tensor) -> torch.Tensor:
    """|| mean_heads softmax(QK^T * scaling + mask)[:, k] * ||v_k|| ||_2 over query rows, for the first N keys
    (value_norm: (kv_heads, N), each key's value norm under its K/V head). -> (N,)

    A key's attention weight says how much of it a query reads; the weight times the value's norm, how much it
    adds to the query's output (Kobayashi et al., 2020): a sink-like key, read a lot but with a small value,
    adds little.
    """
    n_heads, q_len, n = query_.shape[1], query_.shape[2], value_norm.shape[-1]
    probs = attention.attention_probabilities(query_, key, mask, scaling)  # (1, kv_heads, group, q, K)
    weighted = probs[0, ..., :n] * value_norm[:, None, None, :]  # (kv_heads, group, q, N)
    return weighted.reshape(n_heads, q_len, n).mean(dim=0).pow(2).sum(dim=0).sqrt()


def _value_scores(engine: Engine, placed: PlacedContext, layout: Layout, layers: list[int]) -> torch.Tensor:
    """(N,) InfoFlow's score with each head's attention weighted by the key's value norm (the placed values the
    scoring pass reads)."""
    _value_norms[:] = [placed.values[layer].norm(dim=-1) for layer in sorted(layers)]  # (kv_heads, N) each
    try:
        scores = scoring.question_attention_scores(engine.model, placed, layout.query_ids, layers)
        if _value_norms:
            raise RuntimeError(f"{len(_value_norms)} scoring layers did not run the value-weighted score")
        return scores
    finally:
        _value_norms.clear()


def _study_probe(engine: Engine, placed: PlacedContext, layout: Layout, score_dtype: str) -> Probe:
    """The engine's probe, plus ``repair(chosen)``: recompute ``chosen`` (and the fresh tokens) in place,
    ``last_row_scores(layers, rows)``: InfoFlow's score over the fresh block's last rows, and
    ``value_scores(layers)``: InfoFlow's score with each head's attention weighted by the value norm."""
    probe = _plain_probe(engine, placed, layout, score_dtype)
    probe.repair = lambda chosen: recompute.recompute(engine.model, placed, chosen, *query.fresh_inputs(layout))
    probe.last_row_scores = lambda layers, rows: _last_row_scores(engine, placed, layout, layers, rows)
    probe.value_scores = lambda layers: _value_scores(engine, placed, layout, layers)
    probe.colon_ids = lambda: _colon_ids(engine)
    probe.inv_freq = engine.inv_freq
    return probe


@functools.cache
def _colon_ids(engine: Engine) -> torch.Tensor:
    """(c,) ids of the vocabulary's tokens whose text holds a colon."""
    vocabulary = engine.tokenizer.convert_ids_to_tokens(list(range(len(engine.tokenizer))))
    return torch.tensor([i for i, token in enumerate(vocabulary) if token and ":" in token], dtype=torch.long)


# The hooks the study needs; the library's selectors never call repair or last_row_scores, and the row filter
# is off outside a last-rows score.
query.probe = _study_probe
attention.grouped_attention = _study_grouped_attention


def candidates(ratio: float) -> dict[str, dict]:
    """Name -> ``engine.prepare`` options; every rule at the same token budget unless its name says otherwise."""
    return {
        "none": {"selector": "none"},
        "random": {"selector": "random", "ratio": ratio},
        "epic": {"selector": "epic", "ratio": ratio},
        "cacheblend": {"selector": "cacheblend", "ratio": ratio},
        "infoflow": {"selector": "infoflow", "ratio": ratio},
        "infoflow@0.25": {"selector": "infoflow", "ratio": 0.25},
        **{
            f"sink{k}+infoflow": {"selector": "sinkflow", "ratio": ratio, "selector_options": {"sink": k}}
            for k in (2, 4, 8, 12, 16)  # from InfoFlow (0 sink tokens) towards EPIC (the budget on passage heads)
        },
        "infoflow-maxhead": {"selector": "infoflow", "ratio": ratio, "selector_options": {"heads": "max"}},
        "sink4+infoflow-maxhead": {
            "selector": "sinkflow",
            "ratio": ratio,
            "selector_options": {"sink": 4, "heads": "max"},
        },
        "deviation*infoflow": {"selector": "study-deviation-infoflow", "ratio": ratio},
        "passages+infoflow": {"selector": "study-passages", "ratio": ratio},
        # The budget ladder for an adaptive budget: sinkflow at rising ratios, in this order, each row with
        # step_kl, how far its first-token distribution moved from the rung below (needs no reference).
        **{f"ladder-sinkflow@{r:g}": {"selector": "sinkflow", "ratio": r} for r in LADDER},
        **{
            f"repaired-sink{k}+infoflow": {
                "selector": "study-repaired-sinkflow",
                "ratio": ratio,
                "selector_options": {"sink": k},
            }
            for k in (4, 8)
        },
        # Scored by the rows nearest the answer: the whole question block (the library's score_rows="block"),
        # then only its last rows.
        "sinkflow+block": {"selector": "sinkflow", "ratio": ratio, "score_rows": "block"},
        **{
            f"sink8+block-last{rows}": {
                "selector": "study-lastrows-sinkflow",
                "ratio": ratio,
                "selector_options": {"rows": rows},
            }
            for rows in (8, 1)
        },
        # Round 9: a linear ranker fitted (logistic regression, standardised features folded into the weights)
        # to the round-8 iterated effect oracle's picks on questions 0-44; tried on questions 45 on.
        "ranker": {
            "selector": "study-ranker",
            "ratio": ratio,
            "selector_options": {
                "weights": {
                    "log score": 0.6479,
                    "log dev1": 0.2645,
                    "head8": 0.3891,
                    "log1p off": -0.0938,
                    "reloff": 0.2928,
                    "log passage rel": -0.166,
                    "from_q": -0.1615,
                }
            },
        },
        # Round 13: the head tokens by content: the title (through its colon), or 8 tokens right after it.
        "title+infoflow": {"selector": "study-title-sinkflow", "ratio": ratio, "selector_options": {"part": "title"}},
        "after8+infoflow": {"selector": "study-title-sinkflow", "ratio": ratio, "selector_options": {"part": "after"}},
        # Round 12: InfoFlow's score with each head's attention weighted by the key's value norm.
        **{
            name: {"selector": "study-value-sinkflow", "ratio": ratio, "selector_options": {"sink": k}}
            for name, k in (("vinfoflow", 0), ("sink8+vinfoflow", 8))
        },
        # Round 14: the stale cache moved by an affine map fitted on other development questions, then each rule.
        **{
            f"calibrated+{inner}": {
                "selector": "study-calibrated",
                "ratio": ratio,
                "selector_options": {"fit": CALIBRATION_FIT, "inner": inner},
            }
            for inner in ("none", "sinkflow", "infoflow")
        },
        **{
            f"calibrated-{parts}+none": {
                "selector": "study-calibrated",
                "ratio": ratio,
                "selector_options": {"fit": CALIBRATION_FIT, "inner": "none", "parts": parts},
            }
            for parts in ("k", "v")
        },
        # Round 15: the rule over passages prefilled behind the prompt head + the neutral lead-in (a store-time
        # change): `filler+` keeps the first passage's plain, exact cache, `leadin+` is the library's lead-in engine
        # (every passage behind the lead-in, the first one stale too).
        **{
            f"{cache}+{name}": {**options, "prefill": cache}
            for cache in ("filler", "leadin")
            for name, options in (
                ("none", {"selector": "none"}),
                ("sinkflow", {"selector": "sinkflow", "ratio": ratio}),
                ("epic", {"selector": "epic", "ratio": ratio}),
            )
        },
        **{
            f"sinkshare{share}+infoflow": {
                "selector": "study-sinkshare",
                "ratio": ratio,
                "selector_options": {"share": share},
            }
            for share in (0.4, 0.55, 0.7)  # sink8 is share ~0.41 on a 130-token passage at 15 %
        },
    }


FULL_PREFILL = {"selector": "full", "template": DEFAULT_PROMPT, "max_new_tokens": MAX_NEW_TOKENS}


def first_exact(engine: Engine, lead: Engine, passages: list[str]) -> list[PassageKV]:
    """The ``filler+`` cache: the first passage's plain cache (exact right behind the head), the others prefilled
    behind ``lead``'s lead-in with their keys moved back to ``engine``'s local positions, so that ``engine`` places
    them like any stored passage (RoPE is a rotation: the move is exact)."""
    shift = len(lead.passage_context) - len(engine.prefix)
    behind = lead.prefill(passages[1:])
    for kv in behind:
        kv.keys = rotate_keys(kv.keys, torch.full((len(kv),), -shift), engine.inv_freq)
        kv.offset = len(engine.prefix)
    return engine.prefill(passages[:1]) + behind


def _full_reference(engine: Engine, ex: EvalExample) -> tuple[fidelity.Reference, Prepared]:
    """Full prefill's greedy answer to ``ex`` and its distributions along it (what every candidate is forced
    along), and full's prepared query, whose cache holds the prompt's full-context K/V."""
    full = engine.prepare(ex.question, ex.passages, **FULL_PREFILL)
    answer_ids = engine.decode(full, max_new_tokens=MAX_NEW_TOKENS).answer_ids
    return fidelity.reference(answer_ids, engine.teacher_force(full, answer_ids)), full


def _full_confidence(ref: fidelity.Reference) -> list[float]:
    """(m+1,) full's probability of its own token at each answer position, as the rows store it."""
    return [round(float(x), 4) for x in ref.log_probs.max(-1).values.exp()]


def run(engine: Engine, start: int, questions: int, chosen: dict[str, dict], out_path: Path) -> None:
    done = {(r["id"], r["candidate"]) for r in _read(out_path)}
    lead = engine.replace(lead_in=NEUTRAL_LEAD_IN) if any("prefill" in options for options in chosen.values()) else None
    examples = load_hotpotqa("passage", start=start, limit=questions)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", encoding="utf-8") as out:
        for number, ex in enumerate(examples, start=1):
            todo = [name for name in chosen if (ex.id, name) not in done]
            if any(name.startswith("ladder-") for name in todo):  # a rung's step_kl needs the rung below: redo all
                todo = [name for name in chosen if name.startswith("ladder-") or name in todo]  # later rows win
            if not todo:
                continue
            # Which engine prepares each cache, and the cache: the lead-in engine refuses a plain passage.
            stale = {"plain": (engine, engine.prefill(ex.passages))}
            caches = {chosen[name].get("prefill") for name in todo}
            if "filler" in caches:
                stale["filler"] = (engine, first_exact(engine, lead, ex.passages))
            if "leadin" in caches:
                stale["leadin"] = (lead, lead.prefill(ex.passages))
            ref, _ = _full_reference(engine, ex)
            answer_ids, gold = ref.answer_ids, engine.answer_token_ids(ex.answers[0])
            rung_below = None  # the previous ladder rung's first-token log-probabilities, this question
            for name in todo:
                options = dict(chosen[name])
                preparer, kvs = stale[options.pop("prefill", "plain")]
                started = time.perf_counter()
                prep = preparer.prepare(
                    ex.question, kvs, template=DEFAULT_PROMPT, max_new_tokens=MAX_NEW_TOKENS, **options
                )
                prepare_s = time.perf_counter() - started
                row = {"id": ex.id, "candidate": name, "prepare_s": prepare_s, "answer_tokens": len(answer_ids)}
                logits = preparer.teacher_force(prep, answer_ids)  # (m+1, vocab)
                row |= fidelity.answer_fidelity(ref, logits) | {"full_p": _full_confidence(ref)}  # --tails reads both
                row["gold_nll"] = fidelity.gold_nll(preparer.teacher_force(prep, gold), gold)
                n = prep.placed.token_ids.numel()
                row["context_tokens"] = prep.placed.n_passage_tokens
                row["pick_position"] = float(prep.chosen.float().mean() / n) if prep.chosen.numel() else None
                if name.startswith("ladder-"):
                    log_p = prep.out.logits.double().log_softmax(-1)  # (vocab,)
                    if rung_below is not None:
                        row["step_kl"] = float((log_p.exp() * (log_p - rung_below)).sum())
                    rung_below = log_p
                out.write(json.dumps(row) + "\n")
                out.flush()
            print(f"{number}/{len(examples)} {ex.id}", flush=True)


def by_name(rows: list[dict], key: str = "candidate") -> dict[str, dict[str, dict]]:
    """Rows grouped as name (``row[key]``) -> question id -> row; a later row for the same pair wins."""
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r[key], {})[r["id"]] = r
    return by


def kl_cells(kl: list[float]) -> str:
    """Three table cells for one method's kl_answer values: n, the mean with its 95 % interval, the median."""
    est = mean_ci(kl)
    return f"{len(kl)} | {est.mean:.4f} [{est.low:.4f}, {est.high:.4f}] | {np.median(kl):.4f}"


def paired_kl_cells(ours: list[float], theirs: list[float]) -> str:
    """Three table cells for paired kl_answer values: the mean difference, the geometric-mean ratio (each with
    its 95 % interval) and the closer/further counts."""
    d, log_ratio = paired_diff(ours, theirs), log_kl_diff(ours, theirs)
    ratio = f"{10**log_ratio.mean:.2f} [{10**log_ratio.low:.2f}, {10**log_ratio.high:.2f}]"
    closer = sum(a < b for a, b in zip(ours, theirs, strict=True))
    further = sum(a > b for a, b in zip(ours, theirs, strict=True))
    return f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] | {ratio} | {closer}/{further}"


def summary(rows: list[dict], baseline: str = "infoflow") -> str:
    """Markdown: per candidate, means with CIs and medians, and kl_answer paired with ``baseline``: the mean
    difference, the geometric-mean ratio (KL is heavy-tailed: a few questions dominate the mean, while the
    ratio weighs every question alike) and the closer/further counts."""
    by = by_name(rows)
    base = by.get(baseline, {})
    lines = [
        f"| candidate | n | kl_answer [95% CI] | median | top1 % | gold_nll | prepare s (mean) | pick position "
        f"| Δkl_answer vs {baseline} [95% CI] | kl ratio vs {baseline} (geometric) [95% CI] | closer/further |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per_id in by.items():
        kl = [r["kl_answer"] for r in per_id.values()]
        positions = [r["pick_position"] for r in per_id.values() if r.get("pick_position") is not None]
        shared = sorted(per_id.keys() & base.keys())
        paired = "—"
        if name != baseline and shared:
            paired = paired_kl_cells([per_id[i]["kl_answer"] for i in shared], [base[i]["kl_answer"] for i in shared])
        else:
            paired += " | — | —"
        lines.append(
            f"| {name} | {kl_cells(kl)} | {100 * np.mean([r['top1'] for r in per_id.values()]):.1f} | "
            f"{np.mean([r['gold_nll'] for r in per_id.values()]):.3f} | "
            f"{np.mean([r['prepare_s'] for r in per_id.values()]):.2f} | "
            f"{np.mean(positions) if positions else float('nan'):.2f} | {paired} |"
        )
    return "\n".join(lines)


def ladder_summary(rows: list[dict], taus: tuple[float, ...] = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)) -> str:
    """Markdown: an adaptive budget replayed on the ladder rows. Per question, recompute rung after rung and stop
    at the first rung from the second on whose step_kl (how far the first-token distribution moved from the rung
    below) is under tau, else at the top rung: its kl_answer at the budget it spent. The fixed rungs beside it,
    and each rule paired with the fixed rung at 0.15 on kl_answer."""
    rungs: dict[str, dict[float, dict]] = {}
    for r in rows:
        if r["candidate"].startswith("ladder-"):
            rungs.setdefault(r["id"], {})[float(r["candidate"].rpartition("@")[2])] = r
    # Every rung, each above the first with its step_kl (a rung resumed after an interruption has none).
    complete = {
        q: by_ratio
        for q, by_ratio in rungs.items()
        if set(by_ratio) == set(LADDER) and all("step_kl" in by_ratio[r] for r in LADDER[1:])
    }
    if not complete:
        return "No question has every ladder rung yet."
    ids = sorted(complete)

    def stop(by_ratio: dict[float, dict], tau: float) -> float:
        return next((r for r in LADDER[1:] if by_ratio[r]["step_kl"] < tau), LADDER[-1])

    rules = {f"fixed {r:g}": {q: r for q in ids} for r in LADDER}
    rules |= {f"step_kl < {tau:g}": {q: stop(complete[q], tau) for q in ids} for tau in taus}
    base = [complete[q][0.15]["kl_answer"] for q in ids]
    lines = [
        "| rule | n | mean ratio | kl_answer [95% CI] | median | top1 % | Δkl_answer vs fixed 0.15 [95% CI] "
        "| kl ratio vs fixed 0.15 (geometric) [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, spent in rules.items():
        kl = [complete[q][spent[q]]["kl_answer"] for q in ids]
        est, d, ratio = mean_ci(kl), paired_diff(kl, base), log_kl_diff(kl, base)
        top1 = 100 * np.mean([complete[q][spent[q]]["top1"] for q in ids])
        lines.append(
            f"| {name} | {len(ids)} | {np.mean(list(spent.values())):.3f} | {est.mean:.4f} [{est.low:.4f}, "
            f"{est.high:.4f}] | {np.median(kl):.4f} | {top1:.1f} | {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] | "
            f"{10**ratio.mean:.2f} [{10**ratio.low:.2f}, {10**ratio.high:.2f}] |"
        )
    return "\n".join(lines)


def append_rows(out_path: Path, start: int, questions: int, rows_for: Callable[[EvalExample], Iterable[dict]]) -> None:
    """For each HotpotQA development question START..START+N-1, append the rows ``rows_for(question)`` yields to
    ``out_path``, a JSON line each, flushed as it is written, so a run cut short loses at most the row in hand;
    ``rows_for`` yields nothing for what is on file already, which makes a rerun resume."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", encoding="utf-8") as out:
        for number, ex in enumerate(load_hotpotqa("passage", start=start, limit=questions), start=1):
            for row in rows_for(ex):
                out.write(json.dumps(row) + "\n")
                out.flush()
            print(f"{number}/{questions} {ex.id}", flush=True)


def noise_floor(engine: Engine, start: int, questions: int, out_path: Path) -> None:
    """Rows of the pseudo-candidate ``full-bf16``: full prefill itself with the weights cast to bfloat16 (how
    models are usually served on GPUs), against full prefill in float32. Not a selector: the yardstick of what
    a perturbation nobody would call a different method costs in kl_answer and in the greedy answer
    (``same_answer``), next to what each selector's stale cache costs."""
    bf16 = Engine(
        LoadedModel(copy.deepcopy(engine.model).to(torch.bfloat16), engine.tokenizer, "bf16", None), **engine.settings
    )
    done = {r["id"] for r in _read(out_path) if r["candidate"] == "full-bf16"}

    def rows_for(ex: EvalExample) -> Iterator[dict]:
        if ex.id in done:
            return
        ref, _ = _full_reference(engine, ex)
        answer_ids = ref.answer_ids
        started = time.perf_counter()
        low = bf16.prepare(ex.question, ex.passages, **FULL_PREFILL)
        row = {"id": ex.id, "candidate": "full-bf16", "prepare_s": time.perf_counter() - started}
        row["answer_tokens"] = len(answer_ids)
        row |= fidelity.answer_fidelity(ref, bf16.teacher_force(low, answer_ids)) | {"full_p": _full_confidence(ref)}
        gold = engine.answer_token_ids(ex.answers[0])
        row["gold_nll"] = fidelity.gold_nll(bf16.teacher_force(low, gold), gold)
        row["same_answer"] = bf16.decode(low, max_new_tokens=MAX_NEW_TOKENS).answer_ids == answer_ids
        row["prompt_tokens"] = low.layout.length
        yield row

    append_rows(out_path, start, questions, rows_for)


def _with_positions(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Candidate -> question id -> row, for the rows that carry per-position fidelity (round 6 on)."""
    return by_name([r for r in rows if "kl_positions" in r])


def tails_split(rows: list[dict], baseline: str, unsure: float = 0.5) -> str:
    """Markdown: ``baseline`` minus each other candidate, on kl_answer whole and on its two parts (the positions
    where full gives its own token at least / less than ``unsure``), with the geometric ratio; each with its
    resolution, |mean| / half-width of the 95 % interval (above 1: the interval excludes 0)."""
    by = _with_positions(rows)

    def parts(r: dict) -> tuple[float, float, float]:
        kl, sure = np.array(r["kl_positions"]), np.array(r["full_p"]) >= unsure
        return kl.mean(), kl[sure].sum() / kl.size, kl[~sure].sum() / kl.size

    def cell(estimate: Estimate, scale=lambda x: x, fmt: str = "+.3f") -> str:
        low, mean, high = (format(scale(x), fmt) for x in (estimate.low, estimate.mean, estimate.high))
        resolution = "n/a" if estimate.resolution is None else f"{estimate.resolution:.2f}"
        return f"{mean} [{low}, {high}], {resolution}"

    base = by.get(baseline, {})
    lines = [
        f"| `{baseline}` minus | plain kl_answer | part at full p ≥ {unsure:g} | part at full p < {unsure:g} "
        "| geometric ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, per_id in by.items():
        ids = shared_ids(base, per_id)
        if name == baseline or not ids:
            continue
        ours, theirs = [parts(base[i]) for i in ids], [parts(per_id[i]) for i in ids]
        split = [cell(paired_diff([a[k] for a in ours], [b[k] for b in theirs])) for k in range(3)]
        ratio = log_kl_diff([a[0] for a in ours], [b[0] for b in theirs])
        geometric = cell(ratio, lambda x: 10**x, ".2f")
        lines.append(f"| {name} | " + " | ".join(split) + f" | {geometric} |")
    return "\n".join(lines)


def tails_summary(rows: list[dict], unsure: float = 0.5) -> str:
    """Markdown: where each candidate's kl_answer mass sits (the library's table, eval.kl_mass)."""
    by = {
        name: [
            AnswerPositions(r["kl_answer"], r["kl_positions"], r["top1_positions"], r["full_p"])
            for r in per_id.values()
        ]
        for name, per_id in _with_positions(rows).items()
    }
    return kl_mass_table(by, unsure, label="candidate")


def _read(path: Path) -> list[dict]:
    """The rows on file (none for a new file); a row cut off by a kill is dropped, so the run can append after it."""
    if not path.exists():
        return []
    drop_partial_line(path)
    return read_json_lines(path)


def per_question_main(doc: str, run, summary, rows: str) -> None:
    """The command line of a study that writes one resumable JSON line per ``rows`` (e.g. "question") on
    development questions: ``run(engine, start, questions, out_path)``, or ``--summary``: ``summary(rows)``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--questions", type=int, default=45)
    parser.add_argument("--out", required=True, help=f"JSON lines, one per {rows}; resumed")
    parser.add_argument("--summary", action="store_true", help="print the tables of what is on file and stop")
    args = parser.parse_args()
    out_path = Path(args.out)
    if args.summary:
        print(summary(_read(out_path)))
        return
    if args.start + args.questions > DEV_END:
        raise SystemExit(f"questions {args.start}..{args.start + args.questions - 1} leave the development slice 0-999")
    run(Engine.load(args.model, lead_in=None), args.start, args.questions, out_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--candidates", default="all", help="comma-separated names, or 'all'")
    parser.add_argument("--out", required=True, help="JSON lines, one per (question, candidate); resumed")
    parser.add_argument("--summary", action="store_true", help="print the table of what is on file and stop")
    parser.add_argument("--summary-on", metavar="CANDIDATE", help="with --summary: only the questions CANDIDATE ran on")
    parser.add_argument(
        "--baseline", default="infoflow", help="with --summary or --tails: the candidate every row is paired with"
    )
    parser.add_argument("--ladder", action="store_true", help="print the adaptive-budget replay of the ladder and stop")
    parser.add_argument("--tails", action="store_true", help="print where each candidate's kl_answer mass sits; stop")
    parser.add_argument(
        "--noise-floor",
        action="store_true",
        help="run only full-bf16: full prefill with bfloat16 weights (the yardstick)",
    )
    args = parser.parse_args()
    out_path = Path(args.out)
    if args.tails:
        rows = _read(out_path)
        print(tails_summary(rows) + "\n\n" + tails_split(rows, args.baseline))
        return
    if args.ladder:
        print(ladder_summary(_read(out_path)))
        return
    if args.summary:
        rows = _read(out_path)
        if args.summary_on:
            ran = {r["id"] for r in rows if r["candidate"] == args.summary_on}
            rows = [r for r in rows if r["id"] in ran]
        print(summary(rows, args.baseline))
        return
    if args.start + args.questions > DEV_END:
        raise SystemExit(f"questions {args.start}..{args.start + args.questions - 1} leave the development slice 0-999")
    if args.noise_floor:
        if args.candidates != "all":
            raise SystemExit("--noise-floor runs only full-bf16 (full prefill in bfloat16); drop --candidates")
        noise_floor(Engine.load(args.model, lead_in=None), args.start, args.questions, out_path)
        return
    every = candidates(args.ratio)
    names = list(every) if args.candidates == "all" else args.candidates.split(",")
    if unknown := [n for n in names if n not in every]:
        raise SystemExit(f"unknown candidates {unknown}; choose from {', '.join(every)}")
    run(Engine.load(args.model, lead_in=None), args.start, args.questions, {n: every[n] for n in names}, out_path)


if __name__ == "__main__":
    main()
