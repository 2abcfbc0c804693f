"""JSON-schema-constrained decoding: before each token is picked, every token that cannot continue a JSON text
matching the schema is masked out of the logits, so the answer parses and validates whatever the weights say.

The grammar work is llguidance's (the Rust library vLLM, SGLang and llama.cpp use for structured output): it
compiles the schema to a grammar and keeps an Earley parser over the tokenizer's vocabulary, one mask per step.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

# Compact JSON with the separators of ``json.dumps``: whitespace between tokens is never forced, so a weak model
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
    model then adds keys until the token budget cuts the JSON off (measured: 3 answers in 4 of a random-weight
    model). A schema that wants other keys says ``"additionalProperties": true``."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if out.get("type") == "object" and isinstance(out.get("properties"), dict):
        out.setdefault("additionalProperties", False)
    return out


def grammar_vocabulary(tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]) -> llguidance.LLTokenizer:
    """The vocabulary as llguidance reads it (about a second for a 50k vocabulary: build once per engine).
    Every EOS id ends a constrained answer, as it ends a free one."""
    return llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(eos_ids))


class JsonConstraint:
    """The token mask of one answer: ``mask`` the logits of the next token, then ``consume`` the token picked."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"json_schema cannot be enforced: {self.matcher.get_error()}")

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
