"""Fidelity to full prefill, teacher-forced: how far a method's cache is from the full-prefill cache.

Gold F1 asks whether an answer is right; cache reuse promises the answer full prefill would give. Full
prefill's greedy answer is fed through each method's cache in one forward, and each next-token
distribution along it is compared with full prefill's own:

- ``kl_first``: KL(full ‖ method) at the first answer position (the distribution TTFT is measured on);
- ``kl_answer``: KL(full ‖ method) averaged over the answer's positions, the one after its last token
  included (where full stops or goes on);
- ``top1``: the share of those positions where the method ranks full's token first;
- ``gold_nll``: mean negative log-likelihood per token of the gold answer fed through the cache (the same
  for full's cache): a correctness measure with headroom even where gold F1 has none.

All are exactly 0 (KL), 1 (top1) for full prefill itself, and continuous, so a few hundred questions
separate two selectors that gold F1 cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def position_fidelity(ref: Reference, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer position of a method's logits (m+1, vocab) along ``ref``'s answer: KL(full ‖ method) (m+1,)
    float64, and whether the method ranks full's token first (m+1,) bool."""
    if logits.shape != ref.log_probs.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not align with the reference's {tuple(ref.log_probs.shape)}"
        )
    log_q = logits.double().log_softmax(-1)
    p = ref.log_probs.exp()
    kl = (p * (ref.log_probs - log_q)).sum(-1).clamp_min(0.0)  # rounding can dip a hair below 0
    return kl, log_q.argmax(-1) == ref.log_probs.argmax(-1)


def answer_fidelity(ref: Reference, logits: torch.Tensor) -> dict[str, float]:
    """kl_first, kl_answer and top1 of a method's logits (m+1, vocab) along ``ref``'s answer."""
    kl, same_top = position_fidelity(ref, logits)
    return {"kl_first": float(kl[0]), "kl_answer": float(kl.mean()), "top1": float(same_top.double().mean())}


def gold_nll(logits: torch.Tensor, gold_ids: Sequence[int]) -> float:
    """Mean NLL per token of ``gold_ids`` (g) given the teacher-forced ``logits`` (g+1, vocab) along them."""
    if not gold_ids:
        raise ValueError("the gold answer has no tokens")
    log_q = logits[: len(gold_ids)].double().log_softmax(-1)
    return float(-log_q[torch.arange(len(gold_ids)), torch.tensor(list(gold_ids))].mean())
