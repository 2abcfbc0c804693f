"""Fidelity to full prefill, teacher-forced: how far a method's cache is from the full-prefill cache.

Gold F1 asks whether an answer is right; cache reuse promises the answer full prefill would give. Full
prefill's greedy answer is fed through each method's cache in one forward, and each next-token
distribution along it is compared with full prefill's own:

- ``kl_first``: KL(full ‖ method) at the first answer position (the distribution TTFT is measured on);
- ``kl_answer``: KL(full ‖ method) averaged over the answer's positions, the one after its last token
  included (where full stops or goes on);
- ``top1``: the share of those positions where the method ranks full's token first;
- ``kl_positions``, ``top1_positions``, ``p_positions``: the per-position terms of those means, and the
  method's probability of full's token at each position (for full itself: how sure full was);
- ``gold_nll``: mean negative log-likelihood per token of the gold answer fed through the cache (the same
  for full's cache): a correctness measure with headroom even where gold F1 has none.

All are exactly 0 (KL), 1 (top1) for full prefill itself, and continuous, so a few hundred questions
separate two selectors that gold F1 cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Reference:
    """Full prefill's answer on one question: its tokens and the log-distributions along them."""

    answer_ids: list[int]
    log_probs: torch.Tensor  # (m+1, vocab) float64: log-softmax of full's teacher-forced logits


def reference(answer_ids: Sequence[int], logits: torch.Tensor) -> Reference:
    """``logits`` (m+1, vocab): full prefill's cache teacher-forced along its own answer ``answer_ids`` (m)."""
    if logits.shape[0] != len(answer_ids) + 1:
        raise ValueError(
            f"{len(answer_ids)} answer tokens need {len(answer_ids) + 1} rows of logits, got {logits.shape[0]}"
        )
    return Reference(list(answer_ids), logits.double().log_softmax(-1))


@dataclass(frozen=True)
class PositionFidelity:
    """A method's cache against full's at each answer position (m+1, the one after the answer included)."""

    kl: torch.Tensor  # (m+1,) float64: KL(full ‖ method)
    same_top: torch.Tensor  # (m+1,) bool: the method ranks full's token first
    p_full_token: torch.Tensor  # (m+1,) float64: the method's probability of full's token (for full: its confidence)


def position_fidelity(ref: Reference, logits: torch.Tensor) -> PositionFidelity:
    """Each answer position of a method's logits (m+1, vocab) along ``ref``'s answer."""
    if logits.shape != ref.log_probs.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not align with the reference's {tuple(ref.log_probs.shape)}"
        )
    log_q = logits.double().log_softmax(-1)
    p = ref.log_probs.exp()
    kl = (p * (ref.log_probs - log_q)).sum(-1).clamp_min(0.0)  # rounding can dip a hair below 0
    full_token = ref.log_probs.argmax(-1)  # (m+1,) full's answer tokens, then what it would emit after them
    p_full_token = log_q.gather(-1, full_token[:, None])[:, 0].exp()
    return PositionFidelity(kl, log_q.argmax(-1) == full_token, p_full_token)


def answer_fidelity(ref: Reference, logits: torch.Tensor) -> dict[str, Any]:
    """What a results row stores of a method's logits (m+1, vocab) along ``ref``'s answer: the means kl_first,
    kl_answer and top1, and the positions they are made of (rounded: kl to 1e-6, probabilities to 1e-4), so
    that held-out runs can be analysed by position without running them again."""
    at = position_fidelity(ref, logits)
    return {
        "kl_first": float(at.kl[0]),
        "kl_answer": float(at.kl.mean()),
        "top1": float(at.same_top.double().mean()),
        "kl_positions": [round(float(x), 6) for x in at.kl],
        "top1_positions": at.same_top.tolist(),
        "p_positions": [round(float(x), 4) for x in at.p_full_token],
    }


def gold_nll(logits: torch.Tensor, gold_ids: Sequence[int]) -> float:
    """Mean NLL per token of ``gold_ids`` (g) given the teacher-forced ``logits`` (g+1, vocab) along them."""
    if not gold_ids:
        raise ValueError("the gold answer has no tokens")
    log_q = logits[: len(gold_ids)].double().log_softmax(-1)
    return float(-log_q[torch.arange(len(gold_ids)), torch.tensor(list(gold_ids))].mean())
