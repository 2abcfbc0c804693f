"""The optional reorder stage: passages sorted by the share of their tokens a first, uncorrected scoring round
selects (r_c), densest last, nearest the question. It helps on passage-split data and can hurt on fixed-size
chunks, so it is an option, measured, not a default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .placement import Segment, place
from .scoring import question_attention_scores
from .selection import ratio_budget, top_candidates

if TYPE_CHECKING:
    from .facade import Engine
    from .query import Prompt


def density(engine: Engine, passages: list[Segment], prompt: Prompt, ratio: float) -> dict[int, float]:
    """r_c = |selected in c| / |c| from one scoring round without RoPE correction, per passage index."""
    layout = engine.layout(passages, prompt)
    unplaced = place(layout, engine.inv_freq, engine.model.dtype, "head-local/tail-prompt")
    # Every passage competes here, the first one too: its density must be measured like the others'.
    unplaced.candidate[unplaced.prefix_len :] = True
    scores = question_attention_scores(engine.model, unplaced, layout.query_ids, engine.score_layers)
    chosen = torch.zeros(unplaced.token_ids.numel(), dtype=torch.bool)
    chosen[top_candidates(scores, unplaced.candidate, ratio_budget(unplaced, ratio))] = True
    return {p: float(chosen[s:e].sum()) / (e - s) for p, s, e in unplaced.spans}


def densest_last(engine: Engine, passages: list[Segment], prompt: Prompt, ratio: float) -> list[Segment]:
    """Published ordering: densest passage last, nearest the question (stable sort, ascending)."""
    if any(seg.kv is None for seg in passages):
        return passages  # nothing cached to score
    r = density(engine, passages, prompt, ratio)
    return sorted(passages, key=lambda seg: r[seg.passage])
