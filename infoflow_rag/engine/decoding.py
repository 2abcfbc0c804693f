"""Token-by-token decoding on a prepared cache, and text deltas with stop strings held back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def pick(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator) -> int:
    """Next token from logits (vocab,): argmax, or nucleus sampling at the configured temperature."""
    if cfg.temperature == 0.0:
        return int(logits.argmax())
    probs = (logits.float() / cfg.temperature).softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p  # always keeps the top token
    sorted_p = sorted_p * keep
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])


@torch.inference_mode()
def generate_tokens(
    model: PreTrainedModel,
    cache: DynamicCache,
    first_logits: torch.Tensor,
    next_position: int,
    cfg: GenerationConfig,
    eos_ids: set[int],
) -> Iterator[int]:
    """Yield generated token ids until EOS or ``max_new_tokens``; the first comes from ``first_logits``.

    One query per step needs no mask: it sees the whole cache, whatever order its entries are in.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    token = pick(first_logits, cfg, generator)
    for step in range(cfg.max_new_tokens):
        if token in eos_ids:
            return
        yield token
        if step + 1 == cfg.max_new_tokens:
            return
        out = model(
            input_ids=torch.tensor([[token]]),
            position_ids=torch.tensor([[next_position + step]]),
            cache=cache,
        )
        token = pick(out.logits[0, -1], cfg, generator)


def text_deltas(tokens: Iterator[int], tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> Iterator[str]:
    """Turn token ids into text deltas; stop before a stop string, never emitting any part of it.

    Text that could still become a stop string, and incomplete UTF-8 (U+FFFD at the end), is held back.
    """
    ids: list[int] = []
    emitted = 0
    hold = max((len(s) for s in stop), default=1) - 1
    text = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text) - hold
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    if len(text) > emitted:
        yield text[emitted:]
