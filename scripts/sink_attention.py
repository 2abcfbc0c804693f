"""Selector study, round 11: do stale passage heads pull the question's attention? (development questions only)

Sink repair (sinkflow, EPIC) helps, and the study explains it by a hypothesis: each passage was prefilled alone
behind the prompt head, so its first tokens became attention sinks, and at query time the question is pulled
towards those stale keys. This measures it. Per question, InfoFlow's score (the question's attention norm on each
placed token) over the stale cache and over full prefill's cache for the same prompt, on groups of layers, and
the share of it on the first k tokens of the stale passages (every passage after the first), beside the share
of tokens they are (what a flat attention would give them).

    .venv/bin/python scripts/sink_attention.py --questions 45 --out docs/sink-attention.jsonl
    .venv/bin/python scripts/sink_attention.py --out docs/sink-attention.jsonl --summary
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from selector_study import _read, append_rows, per_question_main  # noqa: E402
from stale_gap import Question, load_question  # noqa: E402

from infoflow_rag.engine import Engine  # noqa: E402
from infoflow_rag.engine.placement import PlacedContext  # noqa: E402
from infoflow_rag.engine.scoring import question_attention_scores  # noqa: E402
from infoflow_rag.eval.datasets import EvalExample  # noqa: E402
from infoflow_rag.eval.stats import mean_ci  # noqa: E402

HEADS = (1, 2, 4, 8)  # first k tokens of each stale passage


def layer_groups(engine: Engine) -> dict[str, list[int]]:
    """InfoFlow's own scoring layers, and the model's layers in thirds."""
    n = engine.num_layers
    thirds = [list(range(n * i // 3, n * (i + 1) // 3)) for i in range(3)]
    return {"infoflow": list(engine.score_layers)} | {f"layers {g[0]}-{g[-1]}": g for g in thirds}


def head_shares(scores: torch.Tensor, spans: list[tuple[int, int]], heads=HEADS) -> dict[int, float]:
    """Share of ``scores`` (N,) summed over the first k tokens of every span (start, end), for each k."""
    total = float(scores.sum())
    return {k: sum(float(scores[s : min(s + k, e)].sum()) for s, e in spans) / total for k in heads}


def scores_on(q: Question, placed: PlacedContext, layers: list[int]) -> torch.Tensor:
    """(N,) the question's attention norm on each placed token, averaged over ``layers``."""
    return question_attention_scores(q.engine.model, placed, q.layout.query_ids, layers)


def measure(q: Question) -> dict:
    spans = [(s, e) for _, s, e in q.stale_passages]
    n = q.placed.token_ids.numel()
    row = {"flat": head_shares(torch.ones(n), spans), "n_stale": len(spans), "n_placed": n}
    fresh = q.fresh_placed()
    for name, layers in layer_groups(q.engine).items():
        row[name] = {
            "stale": head_shares(scores_on(q, q.placed, layers), spans),
            "full": head_shares(scores_on(q, fresh, layers), spans),
        }
    return row


def run(engine: Engine, start: int, questions: int, out_path: Path) -> None:
    done = {r["id"] for r in _read(out_path)}

    def rows_for(ex: EvalExample) -> Iterator[dict]:
        if ex.id not in done:
            yield {"id": ex.id} | measure(load_question(engine, ex)[0])

    append_rows(out_path, start, questions, rows_for)


def summary(rows: list[dict]) -> str:
    """Markdown: mean share of the score on the first k tokens of the stale passages, full's cache vs the stale
    one, and stale / full per question: geometric mean with a bootstrap 95 % interval (questions resampled)."""
    groups = [key for key in rows[0] if isinstance(rows[0][key], dict) and "stale" in rows[0][key]]
    lines = [
        "| layers | k | flat share | full's cache | stale cache | stale / full (geometric) [95% CI] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for group in groups:
        for k in map(str, HEADS):
            full = np.array([r[group]["full"][k] for r in rows])
            stale = np.array([r[group]["stale"][k] for r in rows])
            flat = np.mean([r["flat"][k] for r in rows])
            ratio = mean_ci(np.log(stale / full))
            lines.append(
                f"| {group} | {k} | {flat:.3f} | {full.mean():.3f} | {stale.mean():.3f} | "
                f"{np.exp(ratio.mean):.2f}× [{np.exp(ratio.low):.2f}, {np.exp(ratio.high):.2f}] |"
            )
    return f"{len(rows)} questions\n\n" + "\n".join(lines)


def main() -> None:
    per_question_main(__doc__, run, summary, rows="question")


if __name__ == "__main__":
    main()
