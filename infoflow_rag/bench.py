"""TTFT of every method side by side in one run, against plain full prefill on the same model.

Methods are interleaved within each repeat, so a busy neighbour slows them all alike; medians are reported, and
beside each speedup the range of its repeats' own (full prefill's time over the method's within one repeat), so a
figure near a target shows whether it holds in every repeat or only in the median.
Next to each measured speedup: the ceiling its FLOPs allow (see :mod:`costmodel`) and the FLOP rate each path
achieved, so "close to the limit" is a number.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .corpus import hotpotqa, paragraph_text
from .costmodel import (
    Cost,
    ModelShape,
    cacheblend_scoring_flops,
    full_prefill_flops,
    infoflow_scoring_flops,
    mean_relative_position,
    recompute_flops,
)
from .engine import Engine
from .engine.prefill import full_prefill
from .engine.query import Prepared, selector_for
from .engine.selection import DEFAULT_RATIO, CacheBlendSelector, InfoFlowSelector
from .eval.methods import MethodSpec, check_methods, engines_for, fixed_ratio, parse_method
from .store import STORAGE_DTYPES

# The default (sinkflow over lead-in caches) beside the published methods, each over the cache it was published on.
BENCH_METHODS = ("full", "sinkflow+leadin", "infoflow", "infoflow+reorder", "cacheblend", "epic", "random", "none")
REFERENCE = "full prefill"  # the row every speedup is measured against: plain full prefill, outside any method


@dataclass
class BenchRow:
    context_tokens: int
    method: str
    times_s: list[float]  # every timed TTFT, in run order (the table shows their median)
    reference_s: list[float]  # full prefill's TTFT in the same repeats, in the same order
    score_share: float  # median share of TTFT spent scoring (InfoFlow attention / CacheBlend check layer)
    recompute_fraction: float
    ceiling: float  # the speedup this method's FLOPs allow (full prefill FLOPs / scoring + recompute FLOPs)
    score_gflop_s: float  # achieved FLOP rate of the scoring pass (nan when there is none)
    recompute_gflop_s: float  # achieved FLOP rate of the recompute (for full prefill: of the whole prefill)
    mean_position: float  # of the recomputed context tokens in the prompt: 0 = its start, 1 = its end

    @property
    def ttft_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def runs(self) -> int:
        return len(self.times_s)

    @property
    def speedup(self) -> float:
        """Median full-prefill TTFT / median method TTFT."""
        return statistics.median(self.reference_s) / self.ttft_s

    @property
    def of_ceiling(self) -> float:
        return self.speedup / self.ceiling

    @property
    def repeat_speedups(self) -> list[float]:
        """Full prefill's TTFT over this method's within each repeat, in run order: the speedup's spread."""
        return [ref / t for ref, t in zip(self.reference_s, self.times_s, strict=True)]

    def to_dict(self) -> dict:
        extra = {"ttft_s": self.ttft_s, "runs": self.runs, "speedup": self.speedup, "of_ceiling": self.of_ceiling}
        return {**asdict(self), **extra, "repeat_speedups": self.repeat_speedups}


def method_cost(engine: Engine, prep: Prepared) -> Cost:
    """The FLOPs of one prepared query's scoring and recompute, next to full prefill of the same prompt."""
    shape = ModelShape.of(engine.model.config)
    layout, n_prompt = prep.layout, prep.out.next_position
    n_context = layout.prefix_len + sum(len(seg) for seg in layout.segments if seg.kv is not None)  # cached tokens
    n_queries = layout.query_ids.numel()
    selector = selector_for(engine, prep.options)
    # The recompute's inputs: the chosen cached tokens and every fresh prompt token (the positions no cached
    # token holds); full prefill places nothing and runs every position, the prefix's too.
    chosen = prep.placed.positions[prep.chosen] if prep.placed is not None else torch.empty(0, dtype=torch.long)
    fresh = torch.ones(n_prompt, dtype=torch.bool)
    if prep.placed is not None:
        fresh[prep.placed.positions] = False
    inputs = torch.cat([chosen, fresh.nonzero()[:, 0]])
    scoring = 0.0
    if isinstance(selector, InfoFlowSelector):  # and its variants: the question's attention
        scoring += infoflow_scoring_flops(shape, n_queries, n_context, selector.layers)
    if isinstance(selector, CacheBlendSelector):
        scoring += cacheblend_scoring_flops(shape, layout.prefix_len, n_context, selector.check_layer)
    if prep.options.reorder:  # the density round: one more question pass on the engine's scoring layers
        scoring += infoflow_scoring_flops(shape, n_queries, n_context, engine.score_layers)
    return Cost(
        full_flops=full_prefill_flops(shape, n_prompt),
        scoring_flops=scoring,
        recompute_flops=recompute_flops(shape, inputs),
        mean_relative_position=mean_relative_position(chosen, n_prompt),
    )


def build_context(engine: Engine, n_tokens: int, n_passages: int | None = None) -> tuple[str, list[str]]:
    """HotpotQA paragraphs, in dataset order, until the passages hold ``n_tokens`` tokens or number ``n_passages``
    (read no further: the dev set's later questions are held out)."""
    passages, total = [], 0
    items = hotpotqa()
    question = items[0]["question"]
    for item in items:
        for title, sentences in item["context"]:
            if len(passages) == n_passages:
                return question, passages
            text = paragraph_text(title, sentences)
            n = len(engine.passage_ids(text))
            if total + n > n_tokens:
                if not passages:
                    raise ValueError(f"no passage fits in {n_tokens} tokens (the first has {n}); ask for more tokens")
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
    _check_repeats(repeats)
    specs = bench_methods(methods, ratio)
    check_contexts(engine, contexts)
    rows = []
    for n_tokens in contexts:
        question, texts = build_context(engine, n_tokens)
        ids = engine.prompt_ids(question, texts)
        engines = engines_for(engine, specs.values())
        # Offline work, never part of TTFT: each kind of cache a method reads.
        kvs = {k: e.prefill(texts) for k, e in engines.items() if any(s.lead_in == k for s in specs.values())}
        costs = {
            m: method_cost(engine, engines[s.lead_in].prepare(question, kvs[s.lead_in], s.options))
            for m, s in specs.items()
        }
        ttft: dict[str, list[float]] = {m: [] for m in ("prefill", *methods)}
        share: dict[str, list[float]] = {m: [] for m in methods}
        score_s: dict[str, list[float]] = {m: [] for m in methods}
        recompute_s: dict[str, list[float]] = {m: [] for m in methods}
        fraction: dict[str, float] = {}
        for repeat in range(repeats + 1):  # repeat 0 warms up allocators and is discarded
            t = time.perf_counter()
            int(full_prefill(engine.model, ids).logits.argmax())
            elapsed = time.perf_counter() - t
            if repeat:
                ttft["prefill"].append(elapsed)
            for method in methods:
                spec = specs[method]
                r = engines[spec.lead_in].answer(question, kvs[spec.lead_in], spec.options, max_new_tokens=1)
                if repeat:
                    ttft[method].append(r.timings.ttft)
                    share[method].append((r.timings.score + r.timings.reorder) / r.timings.ttft)
                    score_s[method].append(r.timings.score + r.timings.reorder)
                    recompute_s[method].append(r.timings.recompute)
                    fraction[method] = r.recompute_fraction
        context = sum(len(kv) for kv in next(iter(kvs.values())))
        full_flops = full_prefill_flops(ModelShape.of(engine.model.config), len(ids))
        nan = float("nan")
        rows.append(
            BenchRow(
                context,
                REFERENCE,
                times_s=ttft["prefill"],
                reference_s=ttft["prefill"],
                score_share=0.0,
                recompute_fraction=1.0,
                ceiling=1.0,
                score_gflop_s=nan,
                recompute_gflop_s=_rate(full_flops, ttft["prefill"]),
                mean_position=nan,
            )
        )
        for method in methods:
            cost = costs[method]
            rows.append(
                BenchRow(
                    context,
                    method,
                    times_s=ttft[method],
                    reference_s=ttft["prefill"],
                    score_share=statistics.median(share[method]),
                    recompute_fraction=fraction[method],
                    ceiling=cost.ceiling,
                    score_gflop_s=_rate(cost.scoring_flops, score_s[method]) if cost.scoring_flops else nan,
                    recompute_gflop_s=_rate(cost.recompute_flops, recompute_s[method]),
                    mean_position=cost.mean_relative_position,
                )
            )
    return rows


def check_contexts(engine: Engine, contexts: list[int]) -> None:
    """Refuse a context whose prompt leaves no room for the first token in the model's window, before any prefill
    (a too long one failed only once every passage was prefilled, minutes in), naming the most it can take."""
    for n_tokens in contexts:
        question, texts = build_context(engine, n_tokens)
        prompt = len(engine.prompt_ids(question, texts))
        if prompt < engine.max_positions:
            continue
        context = sum(len(engine.passage_ids(t)) for t in texts)
        most = engine.max_positions - 1 - (prompt - context)  # the window less the first token and the prompt's rest
        raise ValueError(
            f"a context of {n_tokens} tokens makes a {prompt}-token prompt, which leaves no room for the first token "
            f"in the model's {engine.max_positions}-token window; ask for at most {most} context tokens"
        )


def bench_method(method: str, ratio: float) -> MethodSpec:
    """A bench method in the eval grammar (:mod:`infoflow_rag.eval.methods`: ``infoflow+reorder``,
    ``sinkflow+leadin``, ...), recomputing ``ratio`` unless it says its own ``@RATIO``."""
    spec = parse_method(method)
    if "@" in method or fixed_ratio(spec.options.selector):
        return spec
    return dataclasses.replace(spec, options=spec.options.replace(ratio=ratio))


def bench_methods(methods: tuple[str, ...], ratio: float) -> dict[str, MethodSpec]:
    """Each method string's :func:`bench_method`, refused as ``eval`` refuses a list (a configuration twice, two
    uncompressed ``full``): timings are kept by method, and a repeat would only show at the end of the run."""
    specs = [bench_method(m, ratio) for m in methods]
    check_methods(specs)  # on the list: a dict by string would already have folded "full,full" into one
    return dict(zip(methods, specs, strict=True))


def _check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (the timed runs a median is taken of), got {repeats}")


def _rate(flops: float, seconds: list[float]) -> float:
    """GFLOP/s at the median time."""
    return flops / statistics.median(seconds) / 1e9


TABLE_HEADER = (
    "| context | method | TTFT (s) | speedup vs prefill | repeats' range | ceiling | of ceiling | scoring share | "
    "recomputed | mean position | GFLOP/s scoring | GFLOP/s recompute |\n"
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_table(rows: list[BenchRow], header: bool = True) -> str:
    """Markdown rows; ``header=False`` continues a table already started (the CLI prints a context at a time)."""
    lines = [TABLE_HEADER] if header else []
    for r in rows:
        lines.append(
            f"| {r.context_tokens} | {r.method} | {r.ttft_s:.3f} | {r.speedup:.2f}x | {_range(r)} | {r.ceiling:.2f}x | "
            f"{100 * r.of_ceiling:.0f} % | {100 * r.score_share:.1f} % | {100 * r.recompute_fraction:.1f} % | "
            f"{_num(r.mean_position, '.2f')} | {_num(r.score_gflop_s, '.1f')} | {_num(r.recompute_gflop_s, '.1f')} |"
        )
    return "\n".join(lines)


def _range(row: BenchRow) -> str:
    """The repeats' own speedups, lowest to highest; "–" for full prefill itself, 1.00 in every repeat."""
    if row.method == REFERENCE:
        return "–"
    low, high = min(row.repeat_speedups), max(row.repeat_speedups)
    return f"{low:.2f}–{high:.2f}x"


def _num(x: float, fmt: str) -> str:
    return "–" if x != x else format(x, fmt)  # nan: the path does not exist for this method


@dataclass
class PrefillRow:
    passages: int
    tokens: int
    no_signals_s: float  # median prefill time without signals
    signals_s: float  # median prefill time recording entropy and layer evolution
    runs: int
    # Median prefill time, with signals, of the same passages right behind the prompt head; None when the engine
    # prefills there anyway (no lead-in).
    no_lead_in_s: float | None = None

    @property
    def overhead(self) -> float:
        return self.signals_s / self.no_signals_s - 1

    @property
    def lead_in_overhead(self) -> float | None:
        """What prefilling behind the engine's lead-in adds to a passage prefill with signals (None: no lead-in)."""
        return None if self.no_lead_in_s is None else self.signals_s / self.no_lead_in_s - 1

    def to_dict(self) -> dict:
        return {**asdict(self), "overhead": self.overhead, "lead_in_overhead": self.lead_in_overhead}


def bench_prefill(engine: Engine, n_tokens: int = 4096, repeats: int = 3) -> PrefillRow:
    """Passage prefill with and without InfoKV's signals and, for an engine with a lead-in, with signals right
    behind the prompt head too; interleaved on the same passages, medians."""
    _check_repeats(repeats)
    _, texts = build_context(engine, n_tokens)
    # name -> (engine, signals): the engine as configured, without and with signals, and its plain sibling with them
    runs = {"no_signals": (engine, False), "signals": (engine, True)}
    if engine.lead_in is not None:
        runs["no_lead_in"] = (engine.replace(lead_in=None), True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats + 1):  # repeat 0 warms up and is discarded
        for name, (prefiller, signals) in runs.items():
            t = time.perf_counter()
            kvs = prefiller.prefill(texts, signals=signals)
            if repeat:
                times[name].append(time.perf_counter() - t)
    medians = {name: statistics.median(t) for name, t in times.items()}
    tokens = sum(len(kv) for kv in kvs)
    return PrefillRow(
        len(texts), tokens, medians["no_signals"], medians["signals"], repeats, no_lead_in_s=medians.get("no_lead_in")
    )


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

    _check_repeats(repeats)

    question, texts = build_context(engine, 10**9, n_passages)
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
