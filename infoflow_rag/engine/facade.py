"""The engine: answer a question over passages by reusing their KV caches and recomputing a few tokens.

place (global RoPE) -> [reorder] -> score/select -> recompute -> first token -> [compress] -> decode
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..kv import PassageKV
from ..models import DEFAULT_MODEL, LoadedModel, load_model, parameters_sha256
from . import attention, prefill, recompute, scoring
from .check import check_supported
from .compression import Policy, PromptMap, compress_cache, make_policy, validate_keep
from .decoding import GenerationConfig, generate_tokens, text_deltas
from .placement import GEOMETRIES, Layout, PlacedContext, Segment, place
from .prompt import DEFAULT_QUESTION_TEMPLATE, PromptFormat, encode, encode_answer, encode_passage, encode_question
from .result import AnswerResult, StageTimings
from .selection import (
    DEFAULT_RATIO,
    InfoFlowSelector,
    Probe,
    Selector,
    default_score_layers,
    make_selector,
    ratio_budget,
    top_candidates,
)
from .signals import SIGNALS, install_hooks

Passage = str | PassageKV
PREFILL_BATCH_TOKENS = 4096  # padded tokens per prefill forward: bounds activation memory


GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")
# Which tokens of the question block score the context: the raw question (published), or the whole block
# (instruction, question and the end of the chat turn: every token the first answer token is computed from).
SCORE_ROWS = ("question", "block")


@dataclass(frozen=True)
class QueryOptions:
    selector: str = "infoflow"
    ratio: float = DEFAULT_RATIO
    reorder: bool = False
    geometry: str = "global"
    selector_options: tuple[tuple[str, object], ...] = ()
    compress: str = "none"
    keep: float | int = 1.0
    compress_options: tuple[tuple[str, object], ...] = ()

    def make_selector(self, score_layers: list[int]) -> Selector:
        sel = make_selector(self.selector, **dict(self.selector_options))
        if isinstance(sel, InfoFlowSelector) and sel.layers is None:
            sel.layers = score_layers
        return sel

    def make_policy(self) -> Policy:
        return make_policy(self.compress, **dict(self.compress_options))


@dataclass
class Prepared:
    """A query made ready to decode: the cache holds the whole prompt, ``out.logits`` the first token's.

    KV compression (``options.compress``) has not run yet: decoding runs it once the first token is out, so
    it never delays TTFT. :meth:`Engine.compress` runs it on demand (e.g. to inspect the decode cache).
    """

    layout: Layout
    placed: PlacedContext
    chosen: torch.Tensor  # (s,) recomputed indices into the placed tokens
    options: QueryOptions
    out: recompute.Recomputed
    timings: StageTimings
    t0: float  # perf_counter at the call, for TTFT
    policy: Policy  # the KV compression policy decoding applies after the first token
    compressed: bool = False


class Engine:
    """A loaded model plus its fixed prompt prefix, ready to prefill passages and answer over them."""

    def __init__(
        self,
        model: LoadedModel | str = DEFAULT_MODEL,
        *,
        system_prompt: str | None = None,
        score_layers: list[int] | None = None,
        check: bool = True,
        record_signals: bool = True,
    ):
        """``record_signals``: record InfoKV's per-token signals at prefill (costs extra prefill time, see
        ``infoflow-rag bench prefill``); without them ``compress="infokv"`` needs its entropy/evolution weights at 0.
        """
        loaded = load_model(model) if isinstance(model, str) else model
        check_supported(loaded.model.config)
        self.loaded = loaded
        self.model: PreTrainedModel = loaded.model
        # Hashed once: a model built in code has no file to hash, so its parameters are (cheap for small ones).
        self.weights_sha256 = loaded.sha256 or parameters_sha256(loaded.model)
        self.tokenizer: PreTrainedTokenizerBase = loaded.tokenizer
        self.model.eval()
        self.model.config._attn_implementation = attention.register()
        # Every per-forward state (signal recorders, attention capture, sparse queries) lives in context
        # variables, so threads may share this engine; the hooks go in now, before any thread runs a forward.
        install_hooks(self.model)
        self.format = PromptFormat.for_tokenizer(self.tokenizer, system_prompt)
        self.prefix = prefill.prefill_prefix(self.model, encode(self.tokenizer, self.format.head))
        self.inv_freq = self.model.model.rotary_emb.inv_freq.detach().float()  # (head_dim/2,)
        self.num_layers = self.model.config.num_hidden_layers
        self.score_layers = score_layers or default_score_layers(self.num_layers)
        self._check_layers(self.score_layers)
        self.max_positions = int(self.model.config.max_position_embeddings)
        self.record_signals = record_signals
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        if check:
            from .check import run_check  # the gate drives this engine, so it imports lazily

            report = run_check(self, thorough=False)
            report.raise_if_failed()

    def _check_layers(self, layers: list[int]) -> None:
        if bad := [layer for layer in layers if not 0 <= layer < self.num_layers]:
            raise ValueError(
                f"scoring layers {bad} out of range for a {self.num_layers}-layer model; use 0..{self.num_layers - 1}"
            )

    # --- identity -------------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """Everything a passage KV depends on: weights identity, config, dtype, prefix and separator tokens."""
        config = {
            k: v
            for k, v in self.model.config.to_dict().items()
            if not k.startswith("_") and k not in ("transformers_version",)
        }
        blob = json.dumps(
            {
                "model": self.loaded.name,
                "sha256": self.weights_sha256,
                "config": config,
                "dtype": str(self.model.dtype),
                "prefix": self.prefix.token_ids.tolist(),
                "separator": self.format.separator,
                # KV stored without signals must not be served to an engine that records them
                "signals": list(SIGNALS) if self.record_signals else [],
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @property
    def model_info(self) -> dict:
        cfg = self.model.config
        return {
            "name": self.loaded.name,
            "sha256": self.loaded.sha256,
            "model_type": cfg.model_type,
            "layers": self.num_layers,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "score_layers": self.score_layers,
            "max_positions": self.max_positions,
            "prompt_head": self.format.head,
            "prompt_tail": self.format.tail,
        }

    # --- passages -------------------------------------------------------------------------------------

    def passage_ids(self, text: str) -> list[int]:
        ids = encode_passage(self.tokenizer, self.format, text)
        if len(ids) + len(self.prefix) > self.max_positions:
            raise ValueError(
                f"passage of {len(ids)} tokens does not fit the {self.max_positions}-token context window "
                f"behind the {len(self.prefix)}-token prefix; split it into smaller passages"
            )
        return ids

    def answer_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` written as an answer, e.g. a gold answer to :meth:`teacher_force`."""
        return encode_answer(self.tokenizer, self.format, text)

    def kv_problem(self, kv: PassageKV, token_ids: Sequence[int], stored: bool = True) -> str | None:
        """Why ``kv`` cannot serve the passage of ``token_ids`` on this engine (None if it can).

        A ``stored`` entry can pass its checksum and still be wrong for the passage: written for other tokens,
        by another shape of model or prompt prefix, or without the signals this engine records (which its
        store key promises; a caller's own PassageKV needs them only for a policy that reads them).
        """
        if kv.token_ids.tolist() != list(token_ids):
            return "its token ids are not the passage's"
        expected = (*self.prefix.keys.shape[:2], len(token_ids), self.prefix.keys.shape[3])
        if tuple(kv.keys.shape) != expected:
            return f"keys of shape {tuple(kv.keys.shape)}, this engine's are {expected}"
        if kv.offset != len(self.prefix):
            return f"prefilled behind a {kv.offset}-token prefix, this engine's is {len(self.prefix)}"
        if stored and self.record_signals and (missing := set(SIGNALS) - set(kv.signals)):
            return f"signals {sorted(missing)} are missing"
        return None

    def prefill(self, passages: Sequence[str], progress: bool = False) -> list[PassageKV]:
        """Prefill passages alone behind the prefix, batching similar lengths; returns KVs in input order."""
        ids = [self.passage_ids(text) for text in passages]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[PassageKV | None] = [None] * len(ids)
        bar = tqdm(total=len(ids), desc="prefill", unit="passage", disable=not progress)
        start = 0
        while start < len(order):
            end = start + 1  # grow the batch while the padded size stays under the token bound
            while end < len(order) and (end + 1 - start) * len(ids[order[end]]) <= PREFILL_BATCH_TOKENS:
                end += 1
            batch = order[start:end]
            for i, kv in zip(
                batch,
                prefill.prefill_passages(self.model, self.prefix, [ids[i] for i in batch], self.record_signals),
                strict=True,
            ):
                out[i] = kv
            bar.update(len(batch))
            start = end
        bar.close()
        return out  # type: ignore[return-value]

    # --- answering ------------------------------------------------------------------------------------

    def answer(self, question: str, passages: Sequence[Passage], **kwargs) -> AnswerResult:
        """Answer ``question`` over ``passages`` (texts or prefilled :class:`PassageKV`, in prompt order).

        Keyword options: selector (a name of ``selectors.SELECTORS``: "infoflow", "sinkflow", ...), ratio,
        reorder, geometry, template, score_rows ("question" or "block"), selector_options; KV compression
        for decoding: compress ("none", "snapkv", "infokv"), keep (float ratio of passage tokens, or int
        count), compress_options; and generation settings (max_new_tokens, temperature, top_p, seed, stop).
        """
        return self.stream(question, passages, **kwargs).finish()

    def stream(self, question: str, passages: Sequence[Passage], **kwargs) -> AnswerStream:
        """Like :meth:`answer`, but iterate to receive text deltas; ``.result`` is set once exhausted."""
        gen = GenerationConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in GENERATION_KEYS})
        return AnswerStream(
            self._decode(self.prepare(question, passages, max_new_tokens=gen.max_new_tokens, **kwargs), gen)
        )

    def answer_prompt(self, pieces: Sequence[str | PassageKV], **kwargs) -> AnswerResult:
        """Answer a prompt given as pieces (fresh text and cached passages); see :meth:`prepare_prompt`."""
        return self.stream_prompt(pieces, **kwargs).finish()

    def stream_prompt(self, pieces: Sequence[str | PassageKV], **kwargs) -> AnswerStream:
        gen = GenerationConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in GENERATION_KEYS})
        return AnswerStream(self._decode(self.prepare_prompt(pieces, max_new_tokens=gen.max_new_tokens, **kwargs), gen))

    def prepare(
        self,
        question: str,
        passages: Sequence[Passage],
        *,
        template: str = DEFAULT_QUESTION_TEMPLATE,
        score_rows: str = "question",
        **options,
    ) -> Prepared:
        """Everything up to the first token's logits: place, [reorder], score, select, recompute.

        Options: selector, ratio, reorder, geometry, selector_options, compress, keep, compress_options,
        max_new_tokens (for the length check); ``score_rows`` (one of SCORE_ROWS) picks the scoring tokens.
        """
        t0 = time.perf_counter()
        if not passages:
            raise ValueError("no passages: pass at least one passage (text or PassageKV) to answer over")
        if score_rows not in SCORE_ROWS:
            raise ValueError(f"unknown score_rows {score_rows!r}; choose one of {', '.join(SCORE_ROWS)}")
        block = encode_question(self.tokenizer, self.format, question, template)
        tail = torch.tensor(block.token_ids, dtype=torch.long)
        query = block.question if score_rows == "question" else slice(0, len(tail))
        return self._prepare(list(passages), [], tail, query, t0, **options)

    def prepare_prompt(self, pieces: Sequence[str | PassageKV], **options) -> Prepared:
        """Like :meth:`prepare` for a prompt given as pieces: fresh text and cached passages, in order.

        This is how a framework's ready-made prompt string is served: the caller found the cached passages
        inside it; everything else is computed fresh. The text after the last passage scores the context.
        """
        t0 = time.perf_counter()
        pieces = list(pieces)
        trailing = pieces.pop() if pieces and isinstance(pieces[-1], str) else ""
        tail = torch.tensor(encode(self.tokenizer, trailing + self.format.tail), dtype=torch.long)
        fresh = {
            i: torch.tensor(encode(self.tokenizer, p), dtype=torch.long)
            for i, p in enumerate(pieces)
            if isinstance(p, str)
        }
        kvs = [p for p in pieces if isinstance(p, PassageKV)]
        order = [fresh.get(i) for i in range(len(pieces))]  # None marks a passage slot
        return self._prepare(kvs, order, tail, slice(0, len(tail)), t0, **options)

    def _prepare(
        self,
        passages: list[Passage],
        slots: list[torch.Tensor | None],
        tail: torch.Tensor,
        query: slice,
        t0: float,
        *,
        selector: str = "infoflow",
        ratio: float = DEFAULT_RATIO,
        reorder: bool = False,
        geometry: str = "global",
        selector_options: dict | None = None,
        compress: str = "none",
        keep: float | int = 1.0,
        compress_options: dict | None = None,
        max_new_tokens: int = 0,
    ) -> Prepared:
        """passages fill the None slots of ``slots`` (all slots when it is empty); ``tail`` ends the prompt."""
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}; e.g. 0.15 recomputes 15 % of context tokens")
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")
        opts = QueryOptions(
            selector,
            ratio,
            reorder,
            geometry,
            tuple(sorted((selector_options or {}).items())),
            compress,
            validate_keep(keep),
            tuple(sorted((compress_options or {}).items())),
        )
        sel = opts.make_selector(self.score_layers)
        if isinstance(sel, InfoFlowSelector):
            self._check_layers(sel.layers)
        policy = opts.make_policy()  # bad compression options fail now, not after the first token
        timings = StageTimings()
        passages_segs = self._passage_segments(passages, prefill=sel.name != "full", timings=timings, t0=t0)
        if reorder:
            t = time.perf_counter()
            passages_segs = self._reorder(passages_segs, tail, query, slots, opts.ratio)
            timings.reorder = time.perf_counter() - t
        layout = self._layout(passages_segs, slots, tail, query)
        if layout.length + max_new_tokens > self.max_positions:
            raise ValueError(
                f"prompt of {layout.length} tokens + max_new_tokens={max_new_tokens} exceeds the "
                f"{self.max_positions}-token context window; pass fewer or shorter passages"
            )
        policy.check(PromptMap.from_layout(layout))

        t = time.perf_counter()
        placed = place(layout, self.inv_freq, self.model.dtype, "global")
        timings.place = time.perf_counter() - t
        # Scoring may use an ablation geometry; the recompute always runs in the global one.
        scored = placed if geometry == "global" else place(layout, self.inv_freq, self.model.dtype, geometry)
        t = time.perf_counter()
        budget = sel.budget(placed, opts.ratio)
        chosen = sel.select(scored, budget, self._probe(scored, layout)) if budget else torch.empty(0, dtype=torch.long)
        timings.score = time.perf_counter() - t

        fresh = [(s, seg) for s, seg in zip(layout.starts(), layout.segments, strict=True) if seg.kv is None]
        fresh_ids = torch.cat([seg.token_ids for _, seg in fresh])
        fresh_pos = torch.cat([s + torch.arange(len(seg)) for s, seg in fresh])
        t = time.perf_counter()
        out = recompute.recompute(self.model, placed, chosen, fresh_ids, fresh_pos)
        timings.recompute = time.perf_counter() - t
        return Prepared(layout, placed, chosen, opts, out, timings, t0, policy)

    def decode(self, prep: Prepared, **generation) -> AnswerResult:
        """Decode the answer from a :meth:`prepare`-d query (generation settings as in :meth:`answer`)."""
        return AnswerStream(self._decode(prep, GenerationConfig(**generation))).finish()

    def teacher_force(self, prep: Prepared, tokens: Sequence[int]) -> torch.Tensor:
        """Next-token logits (float32) of ``prep``'s cache along ``tokens`` fed as the answer. -> (n+1, vocab)

        Row i is the distribution the i-th answer token is drawn from (row n: what follows the last); rows
        1.. read the cache decoding reads, compressed if the query compresses. One forward, no decoding;
        it may run before or after :meth:`decode`, and leaves the cache holding the prompt only.
        """
        self.compress(prep)  # decoding reads the compressed cache from the second token on
        return recompute.teacher_force(self.model, prep.out, torch.tensor(list(tokens), dtype=torch.long))

    def compress(self, prep: Prepared) -> None:
        """Evict from ``prep``'s cache what its compression policy drops (once; a no-op without a policy)."""
        if prep.compressed or prep.options.compress == "none":
            return
        t = time.perf_counter()
        prompt = PromptMap.from_layout(prep.layout)
        prep.out = compress_cache(self.model, prep.out, prompt, prep.policy, prep.options.keep)
        prep.timings.compress = time.perf_counter() - t
        prep.compressed = True

    def _passage_segments(
        self, passages: list[Passage], prefill: bool, timings: StageTimings, t0: float
    ) -> list[Segment]:
        """One segment per passage; text passages are prefilled here, unless they will be computed fresh anyway."""
        kvs: list[PassageKV | None] = [p if isinstance(p, PassageKV) else None for p in passages]
        texts = [i for i, p in enumerate(passages) if isinstance(p, str)]
        if texts and prefill:
            for i, kv in zip(texts, self.prefill([passages[i] for i in texts]), strict=True):
                kvs[i] = kv
            timings.prefill = time.perf_counter() - t0
        segments = []
        for i, kv in enumerate(kvs):
            if kv is not None and (problem := self.kv_problem(kv, kv.token_ids.tolist(), stored=False)) is not None:
                raise ValueError(
                    f"passage {i} cannot be served from its KV: {problem}; it comes from another model or "
                    "prompt format: prefill it again"
                )
            ids = kv.token_ids if kv is not None else torch.tensor(self.passage_ids(passages[i]))
            segments.append(Segment(ids, kv, passage=i))
        return segments

    def _decode(self, prep: Prepared, gen: GenerationConfig) -> Iterator[str]:
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
                if len(generated) == 1:  # the next step is the first to read the cache: shrink it now
                    self.compress(prep)

        out = prep.out  # compression evicts from out.cache in place, so the generator's cache follows
        tokens = generate_tokens(self.model, out.cache, out.logits, out.next_position, gen, self.eos_ids)
        answer = []
        for delta in text_deltas(timed(tokens), self.tokenizer, gen.stop):
            answer.append(delta)
            yield delta
        if not generated:  # EOS straight away: the first token was still picked
            timings.first_token = time.perf_counter() - t
            timings.ttft = time.perf_counter() - prep.t0
        timings.decode = time.perf_counter() - t - timings.first_token - timings.compress
        kv_bytes = sum(t.nbytes for layer in out.cache.layers for t in (layer.keys, layer.values))
        kv_tokens = prep.out.positions.numel()  # prompt entries decoding read: after compression, if it ran
        return self._result("".join(answer).strip(), prep, generated, kv_tokens, kv_bytes)

    def _layout(
        self, passages: list[Segment], slots: list[torch.Tensor | None], tail: torch.Tensor, query: slice
    ) -> Layout:
        """Passages into their slots (or back to back), fresh slot text between, ``tail`` last."""
        remaining = iter(passages)
        ordered = [next(remaining) if ids is None else Segment(ids) for ids in slots] or list(remaining)
        # Only a passage right behind the prefix saw exactly its real left context at prefill.
        segments = [
            Segment(seg.token_ids, seg.kv, exact=i == 0 and seg.kv is not None, passage=seg.passage)
            for i, seg in enumerate(ordered)
        ]
        tail_start = len(self.prefix) + sum(len(seg) for seg in segments)
        segments.append(Segment(tail))
        return Layout(self.prefix, segments, tail[query], tail_start + torch.arange(len(tail))[query])

    def _probe(self, placed: PlacedContext, layout: Layout) -> Probe:
        return Probe(
            question_scores=lambda layers, heads: scoring.question_attention_scores(
                self.model, placed, layout.query_ids, layers, heads
            ),
            layer_kv=lambda layer: scoring.fresh_layer_kv(self.model, placed, layer),
        )

    def passage_density(
        self,
        question: str,
        passages: Sequence[PassageKV],
        ratio: float = DEFAULT_RATIO,
        template: str = DEFAULT_QUESTION_TEMPLATE,
    ) -> dict[int, float]:
        """r_c = |selected in c| / |c| from one scoring round without RoPE correction (what reorder sorts by)."""
        segments = [Segment(kv.token_ids, kv, passage=i) for i, kv in enumerate(passages)]
        block = encode_question(self.tokenizer, self.format, question, template)
        return self._density(segments, [], torch.tensor(block.token_ids), block.question, ratio)

    def _density(
        self,
        passages: list[Segment],
        slots: list[torch.Tensor | None],
        tail: torch.Tensor,
        query: slice,
        ratio: float,
    ) -> dict[int, float]:
        layout = self._layout(passages, slots, tail, query)
        unplaced = place(layout, self.inv_freq, self.model.dtype, "head-local/tail-prompt")
        # Every passage competes here, the first one too: its density must be measured like the others'.
        unplaced.candidate[unplaced.prefix_len :] = True
        scores = scoring.question_attention_scores(self.model, unplaced, layout.query_ids, self.score_layers)
        chosen = torch.zeros(unplaced.token_ids.numel(), dtype=torch.bool)
        chosen[top_candidates(scores, unplaced.candidate, ratio_budget(unplaced, ratio))] = True
        return {p: float(chosen[s:e].sum()) / (e - s) for p, s, e in unplaced.spans}

    def _reorder(
        self,
        passages: list[Segment],
        tail: torch.Tensor,
        query: slice,
        slots: list[torch.Tensor | None],
        ratio: float,
    ) -> list[Segment]:
        """Published ordering: densest passage last, nearest the question (stable sort, ascending)."""
        if any(seg.kv is None for seg in passages):
            return passages  # nothing cached to score
        density = self._density(passages, slots, tail, query, ratio)
        return sorted(passages, key=lambda seg: density[seg.passage])

    def _result(self, answer: str, prep: Prepared, generated: list[int], kv_tokens: int, kv_bytes: int) -> AnswerResult:
        layout, chosen = prep.layout, prep.chosen.tolist()
        selected: dict[int, list[int]] = {p: [i - s for i in chosen if s <= i < e] for p, s, e in prep.placed.spans}
        for seg in layout.segments:
            if seg.kv is None and seg.passage is not None:  # computed fresh: every token counts as recomputed
                selected[seg.passage] = list(range(len(seg)))
        passages = [seg for seg in layout.segments if seg.passage is not None]
        return AnswerResult(
            answer=answer,
            timings=prep.timings,
            selector=prep.options.selector,
            ratio=prep.options.ratio,
            geometry=prep.options.geometry,
            reorder=prep.options.reorder,
            passage_order=[seg.passage for seg in passages],
            selected=selected,
            passage_tokens={seg.passage: seg.token_ids.tolist() for seg in passages},
            context_tokens=sum(len(seg) for seg in passages),
            prompt_tokens=layout.length,
            generated_tokens=len(generated),
            compress=prep.options.compress,
            keep=prep.options.keep,
            kv_tokens=kv_tokens,
            kv_bytes=kv_bytes,
            answer_ids=list(generated),
        )

    # --- reference ------------------------------------------------------------------------------------

    def prompt_ids(
        self, question: str, passages: Sequence[str], template: str = DEFAULT_QUESTION_TEMPLATE
    ) -> list[int]:
        """The exact token sequence every method answers from (prefix + passages + question block)."""
        ids = self.prefix.token_ids.tolist()
        for text in passages:
            ids += self.passage_ids(text)
        return ids + encode_question(self.tokenizer, self.format, question, template).token_ids

    def full_prefill_answer(
        self, question: str, passages: Sequence[str], template: str = DEFAULT_QUESTION_TEMPLATE, **generation
    ) -> tuple[str, torch.Tensor]:
        """Plain prefill of the whole prompt, nothing cached: the reference answer and first-token logits."""
        gen = GenerationConfig(**generation)
        out = prefill.full_prefill(self.model, self.prompt_ids(question, passages, template))
        tokens = generate_tokens(self.model, out.cache, out.logits, out.next_position, gen, self.eos_ids)
        return "".join(text_deltas(tokens, self.tokenizer, gen.stop)).strip(), out.logits


class AnswerStream:
    """Iterate for text deltas; after the last one, ``result`` holds the :class:`AnswerResult`."""

    def __init__(self, run):
        self._run = run
        self.result: AnswerResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._run

    def finish(self) -> AnswerResult:
        """Consume the stream; return the result."""
        for _ in self:
            pass
        return self.result


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    return {int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None}


__all__ = ["AnswerStream", "Engine", "Prepared"]
