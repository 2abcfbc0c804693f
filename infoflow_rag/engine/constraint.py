"""JSON-schema-constrained decoding: before each token is picked, every token that cannot continue a JSON text
matching the schema is masked out of the logits, so the answer parses and validates whatever the weights say.

The grammar work is llguidance's (the Rust library vLLM, SGLang and llama.cpp use for structured output): it
compiles the schema to a grammar and keeps an Earley parser over the tokenizer's vocabulary, one mask per step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

# Compact JSON with the separators of ``json.dumps`` and no other whitespace outside strings, so a weak model
# cannot spend its token budget on indentation. A schema may override these in its "x-guidance" key.
JSON_STYLE: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def json_grammar(schema: Any) -> str:
    """llguidance's grammar of a JSON schema; a ValueError naming the problem if it cannot be enforced."""
    if not isinstance(schema, dict):
        raise ValueError(
            f"json_schema must be a JSON schema object (a dict), got {type(schema).__name__}; "
            'e.g. {"type": "object", "properties": {"name": {"type": "string"}}}'
        )
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(closed(schema)), defaults=JSON_STYLE)
    except (TypeError, ValueError) as err:  # not serialisable as JSON
        raise ValueError(f"json_schema is not a JSON object: {err}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(
            f"json_schema cannot be enforced: {messages[0].strip()}; send a JSON schema (draft 2020-12) "
            "using the supported keywords"
        )
    return grammar


def closed(schema: Any) -> Any:
    """``schema`` with every object that lists its properties and leaves ``additionalProperties`` unsaid closed to
    them, as OpenAI's strict structured outputs have it. JSON Schema's default admits any other key, and a weak
    model then writes keys of its own until the budget runs out (a random-weight model, sampled: 3 answers in 4).
    A schema that wants other keys says ``"additionalProperties": true``."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if out.get("type") == "object" and isinstance(out.get("properties"), dict):
        out.setdefault("additionalProperties", False)
    return out


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer as llguidance reads it, and the order in which finishing a JSON text tries tokens."""

    tokenizer: llguidance.LLTokenizer
    finish_rank: np.ndarray  # (V,) lowest first: closers (", }, ]), then single bytes, then the rest; ties by id


def grammar_vocabulary(tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]) -> Vocabulary:
    """Built once per engine (about a second for a 50k vocabulary). Every EOS id ends a constrained answer, as it
    ends a free one."""
    ll = llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(eos_ids))
    pieces = [ll.decode_bytes([i]) for i in range(ll.vocab_size)]
    kind = np.array([0 if p and set(p) <= CLOSERS else 1 if len(p) == 1 else 2 for p in pieces], dtype=np.int64)
    return Vocabulary(ll, kind * len(pieces) + np.arange(len(pieces)))


CLOSERS = set(b'"}]')
MAX_FINISH = 512  # a finish longer than this is given up on: the answer will be cut off whatever happens


class JsonConstraint:
    """The grammar of one answer: ``pick`` each token among those it allows, then ``consume`` that token.

    The budget is part of the grammar: a token is taken only if the JSON can still be finished in the tokens left
    after it; otherwise the next token of the shortest finish is taken (close the open string, give the
    required keys their shortest values, close the brackets). A model that rambles, or repeats itself as a
    small model does greedily, still ends with JSON that parses, its last value shortened.
    """

    def __init__(self, vocabulary: Vocabulary, grammar: str):
        self.vocabulary = vocabulary
        self.matcher = llguidance.LLMatcher(vocabulary.tokenizer, grammar, log_level=0)
        self._finish: list[int] | None = None  # the shortest finish from the state the picked token leads to
        if self.matcher.is_error():
            raise ValueError(f"json_schema cannot be enforced: {self.matcher.get_error()}")

    def pick(self, logits: torch.Tensor, left: int, choose: Callable[[torch.Tensor], int]) -> int:
        """The token ``choose`` picks from ``logits`` (vocab,) masked to what the grammar allows, unless the JSON
        could then not be finished within the ``left`` tokens of budget (this one included)."""
        finish = self.finish(self.matcher) if self._finish is None else self._finish
        if len(finish) < left:  # room for a token of the model's choosing, if the JSON can be finished after it
            token = choose(self.mask(logits))
            after = self.matcher.deep_copy()
            if after.consume_token(token) and len(rest := self.finish(after)) < left:
                self._finish = rest  # the next step starts where ``after`` is: its finish is known
                return token
        self._finish = finish[1:]
        return finish[0] if finish else self.vocabulary.tokenizer.eos_token  # complete already: end it here

    def finish(self, matcher: llguidance.LLMatcher) -> list[int]:
        """The shortest way (closers first) from ``matcher``'s state to a complete JSON text, as tokens."""
        probe, tokens = matcher.deep_copy(), []
        while not probe.is_accepting() and not probe.is_stopped() and len(tokens) < MAX_FINISH:
            allowed = np.frombuffer(probe.compute_logit_bias(), dtype=np.uint8).nonzero()[0]  # (k,)
            token = int(allowed[self.vocabulary.finish_rank[allowed].argmin()])
            probe.consume_token(token)
            tokens.append(token)
        return tokens

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (vocab,) with every token the grammar forbids at -inf (model rows past the tokenizer's
        vocabulary included: no token stands for them)."""
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8).bool()  # (V,)
        masked = torch.full_like(logits, float("-inf"))
        n = min(len(allowed), len(logits))
        masked[:n] = logits[:n].masked_fill(~allowed[:n], float("-inf"))
        return masked

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):  # a picked token was masked in: a bug, never a model's choice
            raise RuntimeError(
                f"constrained decoding picked token {token} the grammar forbids: {self.matcher.get_error()}"
            )
