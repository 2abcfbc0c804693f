"""What one answered query reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .options import QueryOptions


@dataclass
class StageTimings:
    """Seconds per stage. ``ttft`` is measured wall time from the call to the first token, not a sum."""

    load_kv: float = 0.0  # reading passage KV from a store (filled by the pipeline)
    retrieve: float = 0.0  # vector search (filled by the pipeline)
    prefill: float = 0.0  # passages given as text and prefilled on the spot
    place: float = 0.0  # re-rotating cached keys into place
    reorder: float = 0.0  # the extra scoring round that orders passages
    score: float = 0.0  # selection, with its model pass: question attention (InfoFlow), check layer (CacheBlend)
    recompute: float = 0.0  # the forward over selected + question tokens
    first_token: float = 0.0  # picking the first token from its logits
    ttft: float = 0.0
    compress: float = 0.0  # ranking and evicting context tokens from the cache, after the first token
    decode: float = 0.0  # every token after the first (compression excluded)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class AnswerResult:
    answer: str
    timings: StageTimings
    options: QueryOptions  # what the query was answered with (selector, ratio, compression, ...)
    passage_order: list[int]  # caller's passage indices in the order they were placed
    selected: dict[int, list[int]]  # caller's passage index -> recomputed token offsets within that passage
    passage_tokens: dict[int, list[int]]  # caller's passage index -> its token ids (separator included)
    context_tokens: int  # passage tokens in the prompt
    prompt_tokens: int  # everything before the answer, prefix and question included
    generated_tokens: int
    kv_tokens: int = 0  # prompt entries in the cache the answer decoded from (after compression, if it ran)
    kv_bytes: int = 0  # peak KV cache bytes while decoding: its entries after the last token (the buffer they are
    # appended into keeps room for max_new_tokens entries, or a quarter more once that is full: engine/cache.py)
    answer_ids: list[int] = field(default_factory=list)  # the generated token ids, EOS excluded
    finish_reason: str = "stop"  # "stop": EOS or a stop string ended the answer; "length": max_new_tokens did

    @property
    def recompute_fraction(self) -> float:
        """Share of passage tokens recomputed."""
        n = sum(len(v) for v in self.selected.values())
        return n / self.context_tokens if self.context_tokens else 0.0

    def to_dict(self) -> dict:
        """JSON-able, with the options' fields at the top level (as ``selector``, ``ratio``, ... always were)."""
        d = asdict(self)
        d.pop("options")
        d = {"answer": d.pop("answer"), "timings": d.pop("timings"), **self.options.to_dict(), **d}
        d["recompute_fraction"] = self.recompute_fraction
        return d
