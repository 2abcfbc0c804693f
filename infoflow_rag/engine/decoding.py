"""Decoding: token-by-token generation on a prepared cache, text deltas with stop strings held back, and the
answer stream that times it all and ends in an :class:`AnswerResult`."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .options import QueryOptions
from .result import AnswerResult

if TYPE_CHECKING:
    from .constraint import JsonConstraint
    from .query import Prepared


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh seed per answer, so sampling differs from one call to the next
    stop: tuple[str, ...] | str = ()  # stop strings (one string: one stop): generation ends before the first one

    def __post_init__(self) -> None:
        # Types first: a float or a string here would fail deep in torch or in a comparison, naming neither.
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:  # NaN fails this too
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        # A string is one stop, as OpenAI's; None none.
        stops = (self.stop,) if isinstance(self.stop, str) else () if self.stop is None else self.stop
        if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if "" in stops:  # found at once: every answer would be empty
            raise ValueError(f"stop strings must not be empty, got {self.stop!r}; drop the empty string")
        object.__setattr__(self, "stop", tuple(stops))  # frozen: a tuple from here on

    def check_schema(self, json_schema: dict | None) -> None:
        """Refuse stop strings with a JSON schema: a stop would cut the JSON before it closes, an answer that does
        not parse (the schema promises one that does)."""
        if json_schema is not None and self.stop:
            raise ValueError(
                f"stop {list(self.stop)} cannot be combined with json_schema: a stop would cut the JSON before it "
                f"closes; drop the stop strings (the schema already ends the answer)"
            )

    @classmethod
    def of(cls, settings: dict[str, Any]) -> GenerationConfig:
        """From keyword settings, a name that is none of them refused with the names there are (Python's own
        error named this class, which no caller writes, for a misspelt or foreign keyword such as max_tokens)."""
        known = [f.name for f in fields(cls)]
        if unknown := sorted(set(settings) - set(known)):
            raise TypeError(
                f"unknown settings {unknown}; generation settings are: {', '.join(known)}; "
                f"query options are: {', '.join(QueryOptions.model_fields)}"
            )
        return cls(**settings)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def pick(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator) -> int:
    """Next token from logits (vocab,): argmax, or nucleus sampling at the configured temperature."""
    if cfg.temperature == 0.0:
        return int(logits.argmax())
    # In float64 (a temperature as small as 1e-300 is 0 in float32) and shifted by the largest logit first: a tiny
    # temperature then sends the others to -inf and keeps the largest at 0, where inf - inf would give NaN.
    logits = logits.double()
    probs = ((logits - logits.max()) / cfg.temperature).softmax(-1)
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
    constraint: JsonConstraint | None = None,
) -> Iterator[int]:
    """Yield generated token ids until EOS or ``max_new_tokens``; the first comes from ``first_logits``.
    With a ``constraint``, each token is picked among those it allows (EOS only once the JSON is complete), and
    the JSON is finished within ``max_new_tokens`` (see :class:`~.constraint.JsonConstraint`).

    One query per step needs no mask: it sees the whole cache, whatever order its entries are in.
    """
    generator = torch.Generator()
    if cfg.seed is None:
        generator.seed()  # a fresh, non-deterministic seed
    else:
        generator.manual_seed(cfg.seed)

    def next_token(logits: torch.Tensor, left: int) -> int:
        if constraint is None:
            return pick(logits, cfg, generator)
        return constraint.pick(logits, left, lambda masked: pick(masked, cfg, generator))

    token = next_token(first_logits, cfg.max_new_tokens)
    for step in range(cfg.max_new_tokens):
        if token in eos_ids:
            return
        if constraint is not None:
            constraint.consume(token)
        yield token
        if step + 1 == cfg.max_new_tokens:
            return
        out = model(
            input_ids=torch.tensor([[token]]),
            position_ids=torch.tensor([[next_position + step]]),
            cache=cache,
        )
        token = next_token(out.logits[0, -1], cfg.max_new_tokens - step - 1)


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


def stripped(deltas: Iterator[str]) -> Iterator[str]:
    """``deltas`` without the whitespace that opens or closes their text: streamed, an answer adds up to what it is
    returned as (whitespace is held back until more text follows it)."""
    held, started = "", False
    for delta in deltas:
        if not started:
            delta = delta.lstrip()
            started = bool(delta)
        text = delta.rstrip()
        if text:
            yield held + text
            held = ""
        held += delta[len(text) :]


def decode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eos_ids: set[int],
    prep: Prepared,
    gen: GenerationConfig,
    compress: Callable[[Prepared], None],
    constraint: JsonConstraint | None = None,
) -> Iterator[str]:
    """Text deltas of the answer to ``prep``; returns its :class:`AnswerResult` (``compress`` runs on ``prep``
    once the first token is out: the next step is the first to read the cache; ``constraint`` masks every
    step's logits, see :func:`generate_tokens`)."""
    timings = prep.timings
    t = time.perf_counter()
    generated: list[int] = []

    def timed(tokens: Iterator[int]) -> Iterator[int]:
        for token in tokens:
            if not generated:
                timings.first_token = time.perf_counter() - t
                timings.ttft = time.perf_counter() - prep.t0
            generated.append(token)
            yield token
            if len(generated) == 1:
                compress(prep)

    out = prep.out  # compression evicts from out.cache in place, so the generator's cache follows
    tokens = generate_tokens(model, out.cache, out.logits, out.next_position, gen, eos_ids, constraint)
    answer = []
    for delta in stripped(text_deltas(timed(tokens), tokenizer, gen.stop)):
        answer.append(delta)
        yield delta
    if not generated:  # EOS straight away: the first token was still picked
        timings.first_token = time.perf_counter() - t
        timings.ttft = time.perf_counter() - prep.t0
    timings.decode = time.perf_counter() - t - timings.first_token - timings.compress
    kv_bytes = sum(t.nbytes for layer in out.cache.layers for t in (layer.keys, layer.values))
    kv_tokens = prep.out.positions.numel()  # prompt entries decoding read: after compression, if it ran
    return result("".join(answer), prep, generated, kv_tokens, kv_bytes, _finish_reason(generated, tokenizer, gen))


def _finish_reason(generated: list[int], tokenizer: PreTrainedTokenizerBase, gen: GenerationConfig) -> str:
    """Why the answer ended: "length", max_new_tokens (unless a stop string did at that very token); else "stop"."""
    if len(generated) < gen.max_new_tokens:
        return "stop"
    text = tokenizer.decode(generated, skip_special_tokens=True)  # what text_deltas searched for the stop strings
    return "stop" if any(s in text for s in gen.stop) else "length"


def result(
    answer: str, prep: Prepared, generated: list[int], kv_tokens: int, kv_bytes: int, finish_reason: str
) -> AnswerResult:
    layout, chosen = prep.layout, prep.chosen.tolist()
    spans = prep.placed.spans if prep.placed is not None else []
    selected: dict[int, list[int]] = {p: [i - s for i in chosen if s <= i < e] for p, s, e in spans}
    for seg in layout.segments:
        if seg.passage is not None and seg.passage not in selected:  # not placed: computed fresh, every token
            selected[seg.passage] = list(range(len(seg)))
    passages = [seg for seg in layout.segments if seg.passage is not None]
    return AnswerResult(
        answer=answer,
        timings=prep.timings,
        options=prep.options,
        passage_order=[seg.passage for seg in passages],
        selected=selected,
        passage_tokens={seg.passage: seg.token_ids.tolist() for seg in passages},
        context_tokens=sum(len(seg) for seg in passages),
        prompt_tokens=layout.length,
        generated_tokens=len(generated),
        kv_tokens=kv_tokens,
        kv_bytes=kv_bytes,
        answer_ids=list(generated),
        finish_reason=finish_reason,
    )


class AnswerStream:
    """Iterate for text deltas; after the last one, ``result`` holds the :class:`AnswerResult`."""

    def __init__(self, run: Iterator[str]):
        self._run = run
        self.result: AnswerResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._run

    def finish(self) -> AnswerResult:
        """Consume the stream; return the result."""
        for _ in self:
            pass
        return self.result
