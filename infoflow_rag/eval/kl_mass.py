"""Where a method's kl_answer sits along the answer: one position per question, forks, or where full was unsure.

kl_answer is a mean over the answer's positions (eval.fidelity). The selector study found that one position
per question carries about two thirds of it, typically one where full prefill itself is near a tie: a mean
moved by a few coin flips resolves two selectors poorly. This table shows, per method, how much of the mass
is of that kind, so a held-out run can be read the same way as the study.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from infoflow_rag.eval.results import QuestionResult


@dataclass(frozen=True)
class AnswerPositions:
    """One method on one question, position by position along full's answer (m+1 positions)."""

    kl_answer: float  # the stored mean (exact; the positions are rounded)
    kl: Sequence[float]  # (m+1,) KL(full ‖ method)
    top1: Sequence[bool]  # (m+1,) the method ranks full's token first
    full_p: Sequence[float]  # (m+1,) full's probability of its own token

    def __post_init__(self) -> None:
        lengths = {"kl": len(self.kl), "top1": len(self.top1), "full_p": len(self.full_p)}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"answer positions of one question must align, got lengths {lengths}: the rows come from different "
                "answers (a method's row and another run's full row?); rerun the question"
            )


def positions_by_method(results: Sequence[QuestionResult]) -> dict[str, list[AnswerPositions]]:
    """Method -> its questions' positions, for the results that stored them and whose question has the
    reference `full` row to tell full's confidence (that row itself is left out: its KL is 0 everywhere)."""
    full_p = {(r.dataset, r.id): r.p_positions for r in results if r.spec.is_reference and r.p_positions is not None}
    by: dict[str, list[AnswerPositions]] = {}
    for r in results:
        p = full_p.get((r.dataset, r.id))
        if r.spec.is_reference or r.kl_positions is None or r.top1_positions is None or p is None:
            continue
        by.setdefault(r.method, []).append(AnswerPositions(r.kl_answer, r.kl_positions, r.top1_positions, p))
    return by


def kl_mass_table(
    by_method: Mapping[str, Sequence[AnswerPositions]], unsure: float = 0.5, label: str = "method"
) -> str:
    """Markdown: where each method's kl_answer mass sits. Each question adds its kl_answer (a mean over its
    m+1 positions) to the total; the columns split that total by position: the question's single worst
    position, the positions where the method ranks another token first than full does (a fork), and those
    where full itself gives its own token less than ``unsure`` probability (full is unsure)."""
    lines = [
        f"| {label} | n | kl_answer | worst position's share | forks' share | share where full p < {unsure:g} "
        f"| forks per question | full p at the worst position (median) | top 10 % of questions' share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per_q in by_method.items():
        total = sum(q.kl_answer for q in per_q)
        if total <= 0:  # exact on every question: there is no mass to split
            lines.append(f"| {name} | {len(per_q)} | 0 |" + " — |" * 6)
            continue
        worst = forks = unsure_mass = 0.0
        worst_p, fork_count = [], 0
        for q in per_q:
            kl, full_p = np.asarray(q.kl, dtype=float), np.asarray(q.full_p, dtype=float)  # (m+1,) each
            fork = ~np.asarray(q.top1, dtype=bool)
            worst += kl.max() / kl.size
            worst_p.append(full_p[kl.argmax()])
            forks += kl[fork].sum() / kl.size
            unsure_mass += kl[full_p < unsure].sum() / kl.size
            fork_count += int(fork.sum())
        top = sorted((q.kl_answer for q in per_q), reverse=True)[: max(1, len(per_q) // 10)]
        lines.append(
            f"| {name} | {len(per_q)} | {total / len(per_q):.4f} | {worst / total:.0%} | {forks / total:.0%} | "
            f"{unsure_mass / total:.0%} | {fork_count / len(per_q):.2f} | {np.median(worst_p):.2f} | "
            f"{sum(top) / total:.0%} |"
        )
    return "\n".join(lines)
