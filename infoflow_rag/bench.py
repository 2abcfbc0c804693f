"""TTFT of every method side by side in one run, against plain full prefill on the same model.

Methods are interleaved within each repeat, so a busy neighbour slows them all alike; medians are reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from .corpus import hotpotqa, paragraph_text
from .engine import Engine
from .engine.prefill import full_prefill
from .engine.selection import DEFAULT_RATIO
from .store import STORAGE_DTYPES

BENCH_METHODS = ("full", "infoflow", "infoflow+reorder", "cacheblend", "epic", "random", "none")


@dataclass
class BenchRow:
    context_tokens: int
    method: str
    ttft_s: float  # median
    speedup: float  # median full-prefill TTFT / median method TTFT
    score_share: float  # median share of TTFT spent scoring (InfoFlow attention / CacheBlend check layer)
    recompute_fraction: float
    runs: int

    def to_dict(self) -> dict:
        return asdict(self)


def build_context(engine: Engine, n_tokens: int) -> tuple[str, list[str]]:
    """HotpotQA paragraphs, in dataset order, until the passages hold ``n_tokens`` tokens."""
    passages, total = [], 0
    items = hotpotqa()
    question = items[0]["question"]
    for item in items:
        for title, sentences in item["context"]:
            text = paragraph_text(title, sentences)
            n = len(engine.passage_ids(text))
            if total + n > n_tokens:
                return question, passages
            passages.append(text)
            total += n
    return question, passages


def bench_ttft(
    engine: Engine,
    contexts: list[int],
    ratio: float = DEFAULT_RATIO,
    methods: tuple[str, ...] = BENCH_METHODS,
    repeats: int = 3,
) -> list[BenchRow]:
    rows = []
    for n_tokens in contexts:
        question, texts = build_context(engine, n_tokens)
        kvs = engine.prefill(texts)  # offline work: never part of TTFT
        ids = engine.prompt_ids(question, texts)
        ttft: dict[str, list[float]] = {m: [] for m in ("prefill", *methods)}
        share: dict[str, list[float]] = {m: [] for m in methods}
        fraction: dict[str, float] = {}
        for repeat in range(repeats + 1):  # repeat 0 warms up allocators and is discarded
            t = time.perf_counter()
            int(full_prefill(engine.model, ids).logits.argmax())
            elapsed = time.perf_counter() - t
            if repeat:
                ttft["prefill"].append(elapsed)
            for method in methods:
                selector, _, flag = method.partition("+")
                r = engine.answer(
                    question, kvs, selector=selector, ratio=ratio, reorder=flag == "reorder", max_new_tokens=1
                )
                if repeat:
                    ttft[method].append(r.timings.ttft)
                    share[method].append((r.timings.score + r.timings.reorder) / r.timings.ttft)
                    fraction[method] = r.recompute_fraction
        reference = statistics.median(ttft["prefill"])
        context = sum(len(kv) for kv in kvs)
        rows.append(BenchRow(context, "full prefill", reference, 1.0, 0.0, 1.0, repeats))
        for method in methods:
            median = statistics.median(ttft[method])
            rows.append(
                BenchRow(
                    context,
                    method,
                    median,
                    reference / median,
                    statistics.median(share[method]),
                    fraction[method],
                    repeats,
                )
            )
    return rows


def format_table(rows: list[BenchRow]) -> str:
    lines = [
        "| context | method | TTFT (s) | speedup vs prefill | scoring share | recomputed |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.context_tokens} | {r.method} | {r.ttft_s:.3f} | {r.speedup:.2f}x | "
            f"{100 * r.score_share:.1f} % | {100 * r.recompute_fraction:.1f} % |"
        )
    return "\n".join(lines)


@dataclass
class PrefillRow:
    passages: int
    tokens: int
    plain_s: float  # median prefill time without signals
    signals_s: float  # median prefill time recording entropy and layer evolution
    runs: int

    @property
    def overhead(self) -> float:
        return self.signals_s / self.plain_s - 1

    def to_dict(self) -> dict:
        return {**asdict(self), "overhead": self.overhead}


def bench_prefill(engine: Engine, n_tokens: int = 4096, repeats: int = 3) -> PrefillRow:
    """Passage prefill with and without InfoKV's signals, interleaved on the same passages; medians."""
    _, texts = build_context(engine, n_tokens)
    if not texts:
        raise ValueError(f"no passage fits in {n_tokens} tokens; ask for more tokens")
    times: dict[bool, list[float]] = {False: [], True: []}
    recording = engine.record_signals
    try:
        for repeat in range(repeats + 1):  # repeat 0 warms up and is discarded
            for signals in (False, True):
                engine.record_signals = signals
                t = time.perf_counter()
                kvs = engine.prefill(texts)
                if repeat:
                    times[signals].append(time.perf_counter() - t)
    finally:
        engine.record_signals = recording
    tokens = sum(len(kv) for kv in kvs)
    return PrefillRow(len(texts), tokens, statistics.median(times[False]), statistics.median(times[True]), repeats)


@dataclass
class StoreRow:
    dtype: str
    bytes_per_token: float  # on disk, per passage token
    load_gb_s: float  # warm reads from disk, GB of stored bytes per second
    load_ms_per_passage: float
    max_logit_diff: float  # first-token logits vs float32 KV, same query
    same_answer: bool

    def to_dict(self) -> dict:
        return asdict(self)


def bench_store(engine: Engine, directory: str, n_passages: int = 40, repeats: int = 3) -> list[StoreRow]:
    """Disk KV store per storage dtype: size, warm load speed, and the effect on the answer."""
    from pathlib import Path

    from .store import CacheKey, DiskKVStore

    question, texts = build_context(engine, 10**9)
    texts = texts[:n_passages]
    kvs = engine.prefill(texts)
    keys = [CacheKey.for_tokens(engine.fingerprint, kv.token_ids) for kv in kvs]
    tokens = sum(len(kv) for kv in kvs)
    reference = engine.prepare(question, kvs[:8]).out.logits
    ref_answer = engine.answer(question, kvs[:8], max_new_tokens=16).answer
    rows = []
    for dtype in STORAGE_DTYPES:
        root = Path(directory) / dtype
        with DiskKVStore(root, dtype=dtype) as store:
            store.put_many(zip(keys, kvs, strict=True))
            size = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
            store.get_many(keys)  # warm the page cache
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                loaded = store.get_many(keys)
                times.append(time.perf_counter() - t)
            elapsed = statistics.median(times)
            logits = engine.prepare(question, loaded[:8]).out.logits
            answer = engine.answer(question, loaded[:8], max_new_tokens=16).answer
        rows.append(
            StoreRow(
                dtype,
                size / tokens,
                size / elapsed / 1e9,
                1000 * elapsed / len(keys),
                float((logits - reference).abs().max()),
                answer == ref_answer,
            )
        )
    return rows
