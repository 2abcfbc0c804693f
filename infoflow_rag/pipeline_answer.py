"""What a pipeline answers: the answer, the passages it came from, the engine's result and how much KV was reused;
and the stream that ends with it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from .engine import AnswerStream
from .engine.result import AnswerResult
from .index.passage_index import Hit


@dataclass
class ReuseStats:
    passages_hit: int  # passages found in the prompt whose KV came from the store
    passages_computed: int  # found in the prompt but not yet stored: prefilled now, reused next time
    reused_tokens: int  # prompt tokens served from cached KV (before selective recompute)
    prompt_tokens: int
    stored_tokens: int = 0  # of reused_tokens, those whose KV the store already held (not prefilled by this call)

    @property
    def reused_share(self) -> float:
        """Share of the prompt whose KV the store already held: 0 when no passage was a hit."""
        return self.stored_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def prefilled_tokens(self) -> int:
        """Of reused_tokens, those whose KV this call prefilled (and stored): a cache write, not a read."""
        return self.reused_tokens - self.stored_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "prefilled_tokens": self.prefilled_tokens, "reused_share": self.reused_share}


@dataclass
class PipelineAnswer:
    answer: str
    sources: list[Hit]
    result: AnswerResult
    reuse: ReuseStats

    def stats(self) -> dict:
        """A flat, JSON-able summary for framework response metadata: method, TTFT, recompute, KV reuse and size."""
        result, options = self.result, self.result.options
        return {
            "selector": options.selector,
            "ratio": options.ratio,
            "ttft": result.timings.ttft,
            "recompute_fraction": result.recompute_fraction,
            "context_tokens": result.context_tokens,
            "generated_tokens": result.generated_tokens,
            "finish_reason": result.finish_reason,
            "compress": options.compress,
            "keep": options.keep,
            "kv_tokens": result.kv_tokens,
            "kv_bytes": result.kv_bytes,
            **self.reuse.to_dict(),
            "timings": result.timings.to_dict(),
        }

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "sources": [asdict(s) for s in self.sources],
            "result": self.result.to_dict(),
            "reuse": self.reuse.to_dict(),
        }


class PipelineStream(AnswerStream):
    """Iterate for answer text deltas; ``.answer`` (and ``finish()``) give the :class:`PipelineAnswer`."""

    def __init__(self, stream: AnswerStream, make: Callable[[AnswerResult], PipelineAnswer]):
        super().__init__(_then(stream, make))

    @property
    def answer(self) -> PipelineAnswer | None:
        return self.result

    def steps(self) -> Iterator[str | PipelineAnswer]:
        """The text deltas, then the :class:`PipelineAnswer` (what an adapter turns into chunks)."""
        yield from self
        yield self.answer


def _then(stream: AnswerStream, make: Callable[[AnswerResult], PipelineAnswer]) -> Iterator[str]:
    yield from stream
    return make(stream.result)
