"""Response bodies in OpenAI's shapes: whole completions, stream chunks, usage and the InfoFlow extension."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..pipeline_answer import PipelineAnswer

STATS_KEY = "infoflow"  # extension field of responses (and of the last stream chunk) with the query's stats


def usage(answer: PipelineAnswer) -> dict:
    """Token counts; cached_tokens are the prompt tokens whose KV the store already held."""
    result = answer.result
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.generated_tokens,
        "total_tokens": result.prompt_tokens + result.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": answer.reuse.stored_tokens},
    }


def stats(answer: PipelineAnswer, queue_s: float) -> dict:
    """Selector, recomputed share, KV reuse, the TTFT split by stage, and retrieved sources."""
    sources = [{"id": h.id, "score": h.score, "source": h.source} for h in answer.sources]
    return {**answer.stats(), "queue_s": queue_s, "sources": sources}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass
class Shape:
    """The id, object names and choice layout of one endpoint's responses."""

    chat: bool
    model: str
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, text: str | None, reason: str | None, stream: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if stream:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}

    def completion(self, answer: PipelineAnswer, queue_s: float) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        body = self._envelope(obj, [self._choice(answer.answer, answer.result.finish_reason, stream=False)])
        return {**body, "usage": usage(answer), STATS_KEY: stats(answer, queue_s)}

    def chunk(self, text: str | None, reason: str | None = None, with_usage: bool = False) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._envelope(obj, [self._choice(text, reason, stream=True)])
        return {**body, "usage": None} if with_usage else body

    def opening(self, with_usage: bool) -> dict | None:
        """Chat streams open with the assistant role and empty content; completion streams need nothing."""
        if not self.chat:
            return None
        body = self.chunk("", with_usage=with_usage)
        body["choices"][0]["delta"]["role"] = "assistant"
        return body

    def closing(self, answer: PipelineAnswer, queue_s: float, with_usage: bool) -> list[dict]:
        """The finishing chunk (with the InfoFlow stats), then, if asked for, the usage chunk."""
        last = {**self.chunk(None, answer.result.finish_reason, with_usage), STATS_KEY: stats(answer, queue_s)}
        if not with_usage:
            return [last]
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return [last, {**self._envelope(obj, []), "usage": usage(answer)}]
