"""The Engine: a loaded model plus its fixed prompt prefix; it prefills passages and answers over them by
running the stages (see the package docstring) with one :class:`QueryOptions`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..kv import PassageKV
from ..models import DEFAULT_MODEL, LoadedModel, load_model, parameters_sha256
from ..text import check_text_list
from . import attention, decoding, last_layer, linears, norms, prefill, query, recompute
from .check import check_supported, run_check
from .compression import PromptMap, compress_cache
from .constraint import JsonConstraint, Vocabulary, grammar_vocabulary, json_grammar
from .decoding import AnswerStream, GenerationConfig, generate_tokens, text_deltas
from .identity import identity_hash, kv_identity, results_model_info
from .lead_in import DEFAULT_LEAD_IN, check_lead_in, passage_context
from .options import QueryOptions, split_overrides
from .placement import Layout, Segment
from .prompt import DEFAULT_QUESTION_TEMPLATE, PromptFormat, encode, encode_answer, encode_passage, encode_question
from .query import Passage, Prepared, Prompt
from .result import AnswerResult
from .selection import default_score_layers
from .signals import SIGNALS, install_hooks

# Padded tokens per passage-prefill forward. Smaller batches keep a layer's activations in cache: on the bench's
# passages behind the lead-in (medians of 3, interleaved in one process, quiet 2-core machine), 1024 against 4096
# took 9.47 s against 13.54 s on SmolLM2-135M (4,059 tokens; 7.25 against 10.07 s without signals) and 18.11 s
# against 22.64 s on Qwen2.5-0.5B (1,952 tokens); 512 was 10.40 and 17.14 s (a little faster on Qwen, slower on
# SmolLM2). A longer passage goes alone.
PREFILL_BATCH_TOKENS = 1024


class Engine:
    """A loaded model plus its fixed prompt prefix, ready to prefill passages and answer over them.

    Build one with :meth:`load`, which also runs the correctness gate; the constructor only refuses models
    whose config it cannot serve exactly (it is what the gate itself and tests with tiny models use).
    """

    def __init__(
        self,
        model: LoadedModel | str = DEFAULT_MODEL,
        *,
        system_prompt: str | None = None,
        score_layers: list[int] | None = None,
        record_signals: bool = True,
        lead_in: str | None = DEFAULT_LEAD_IN,
    ):
        """``record_signals``: record InfoKV's per-token signals at prefill (costs extra prefill time, see
        ``infoflow-rag bench prefill``); without them ``compress="infokv"`` needs its entropy/evolution weights at 0.
        ``lead_in``: text every passage is prefilled behind, after the prompt head (default
        :data:`~infoflow_rag.engine.lead_in.NEUTRAL_LEAD_IN`); None prefills each passage right behind the head, as
        the published methods do, and keeps the first passage's cache exact. It is never part of the prompt: it only
        changes the passages' stale caches (closer to full prefill's on held-out questions), and then no passage's
        cache is exact, the first one's included.
        """
        check_lead_in(lead_in)
        # As given (score_layers None: the model's default), so that replace() keeps "default" a default.
        self.settings = {
            "system_prompt": system_prompt,
            "score_layers": score_layers,
            "record_signals": record_signals,
            "lead_in": lead_in,
        }
        loaded = load_model(model) if isinstance(model, str) else model
        check_supported(loaded.model.config)
        self.loaded = loaded
        self.model: PreTrainedModel = loaded.model
        # Hashed once: a model built in code has no file to hash, so its parameters are (cheap for small ones).
        self.weights_sha256 = loaded.sha256 or parameters_sha256(loaded.model)
        self.tokenizer: PreTrainedTokenizerBase = loaded.tokenizer
        self.model.eval()
        self.model.config._attn_implementation = attention.register()
        # Every per-forward state (signal recorders, attention capture, sparse queries, prefills' batched linears)
        # lives in context variables, so threads may share this engine; the hooks and the linears (their weights
        # packed) go in now, before any thread runs a forward.
        install_hooks(self.model)
        last_layer.install(self.model)
        linears.install(self.model)  # a few rows (decoding) on the compiled kernel, more on packed weights
        norms.install(self.model)  # RMSNorm on torch's fused kernel: the same result in one pass
        self.format = PromptFormat.for_tokenizer(self.tokenizer, system_prompt)
        self.prefix = prefill.prefill_prefix(self.model, encode(self.tokenizer, self.format.head))
        self.lead_in = lead_in
        self.passage_context = passage_context(self.model, self.tokenizer, self.format, self.prefix, lead_in)
        self.inv_freq = self.model.model.rotary_emb.inv_freq.detach().float()  # (head_dim/2,)
        self.num_layers = self.model.config.num_hidden_layers
        self.score_layers = score_layers or default_score_layers(self.num_layers)
        self.check_layers(self.score_layers)
        self.max_positions = int(self.model.config.max_position_embeddings)
        self.record_signals = record_signals
        self.eos_ids = _eos_ids(self.model, self.tokenizer)

    @classmethod
    def load(cls, model: LoadedModel | str = DEFAULT_MODEL, *, check: bool = True, **settings: Any) -> Engine:
        """An engine for ``model`` (a registered name, a Hugging Face dir, a .gguf file or a loaded model);
        with ``check``, the correctness gate runs first and refuses the model if its keys cannot be placed
        exactly (:class:`~infoflow_rag.errors.UnsupportedModelError`). ``settings`` as for the constructor."""
        engine = cls(model, **settings)
        if check:
            run_check(engine, thorough=False).raise_if_failed()
        return engine

    def check_layers(self, layers: list[int]) -> None:
        if bad := [layer for layer in layers if not 0 <= layer < self.num_layers]:
            raise ValueError(
                f"scoring layers {bad} out of range for a {self.num_layers}-layer model; use 0..{self.num_layers - 1}"
            )

    def replace(self, **changes: Any) -> Engine:
        """An engine on the same loaded model with some constructor settings changed, the others kept.

        Not through :meth:`load`: the model already passed the correctness gate.
        """
        if unknown := sorted(set(changes) - set(self.settings)):
            raise TypeError(f"unknown engine settings {unknown}; settings are: {', '.join(self.settings)}")
        return type(self)(self.loaded, **{**self.settings, **changes})

    # --- identity -------------------------------------------------------------------------------------

    @functools.cached_property
    def fingerprint(self) -> str:
        """The hash of :attr:`identity`, computed once: none of it changes over the engine's life."""
        return identity_hash(self.identity)

    @property
    def identity(self) -> dict:
        """Everything a passage KV depends on (:func:`~infoflow_rag.engine.identity.kv_identity`)."""
        return kv_identity(self)

    @property
    def model_info(self) -> dict:
        """What a results file records of this engine (:func:`~infoflow_rag.engine.identity.results_model_info`)."""
        return results_model_info(self)

    # --- passages -------------------------------------------------------------------------------------

    def passage_ids(self, text: str) -> list[int]:
        ids = encode_passage(self.tokenizer, self.format, text)
        if len(ids) + len(self.passage_context) > self.max_positions:
            raise ValueError(
                f"passage of {len(ids)} tokens does not fit the {self.max_positions}-token context window "
                f"behind the {len(self.passage_context)}-token {self._passage_context_name}; split it into smaller "
                "passages"
            )
        return ids

    @property
    def _passage_context_name(self) -> str:
        return "prefix" if self.lead_in is None else "prefix and lead-in"

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
        if kv.offset != len(self.passage_context):
            return (
                f"prefilled behind a {kv.offset}-token prefix, this engine's "
                f"{self._passage_context_name} is {len(self.passage_context)}"
            )
        if stored and self.record_signals and (missing := set(SIGNALS) - set(kv.signals)):
            return f"signals {sorted(missing)} are missing"
        return None

    def prefill(self, passages: Sequence[str], progress: bool = False, signals: bool | None = None) -> list[PassageKV]:
        """Prefill passages alone behind the prefix (and the lead-in, if any), batching similar lengths; returns
        KVs in input order.

        ``signals``: record InfoKV's per-token signals (default: the engine's ``record_signals``). Their entropy
        runs the vocabulary head on every passage token, which on a large-vocabulary model costs more than the
        rest of the prefill: callers that know no policy will read them pass False.
        """
        signals = self.record_signals if signals is None else signals
        check_text_list(passages, "passages")
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
                prefill.prefill_passages(self.model, self.passage_context, [ids[i] for i in batch], signals),
                strict=True,
            ):
                out[i] = kv
            bar.update(len(batch))
            start = end
        bar.close()
        return out  # type: ignore[return-value]

    # --- answering ------------------------------------------------------------------------------------

    def answer(
        self, question: str, passages: Sequence[Passage], options: QueryOptions | None = None, **overrides: Any
    ) -> AnswerResult:
        """Answer ``question`` over ``passages`` (texts or prefilled :class:`PassageKV`, in prompt order).

        ``options`` (default: ``QueryOptions()``) says how; keyword ``overrides`` change single options
        (``selector="epic"``, ``ratio=0.25``, ...). Also accepted as keywords: ``template`` (the question
        wording, ``{question}`` once) and the generation settings of :class:`GenerationConfig`
        (max_new_tokens, temperature, top_p, seed, stop).
        """
        return self.stream(question, passages, options, **overrides).finish()

    def stream(
        self, question: str, passages: Sequence[Passage], options: QueryOptions | None = None, **overrides: Any
    ) -> AnswerStream:
        """Like :meth:`answer`, but iterate to receive text deltas; ``.result`` is set once exhausted."""
        options, rest = split_overrides(options, overrides)
        template = rest.pop("template", DEFAULT_QUESTION_TEMPLATE)
        gen = GenerationConfig.of(rest)
        gen.check_schema(options.json_schema)  # before any prefill
        prep = self.prepare(question, passages, options, template=template, max_new_tokens=gen.max_new_tokens)
        return AnswerStream(self._decode(prep, gen))

    def answer_prompt(
        self, pieces: Sequence[str | PassageKV], options: QueryOptions | None = None, **overrides: Any
    ) -> AnswerResult:
        """Answer a prompt given as pieces (fresh text and cached passages); see :meth:`prepare_prompt`."""
        return self.stream_prompt(pieces, options, **overrides).finish()

    def stream_prompt(
        self, pieces: Sequence[str | PassageKV], options: QueryOptions | None = None, **overrides: Any
    ) -> AnswerStream:
        options, rest = split_overrides(options, overrides)
        gen = GenerationConfig.of(rest)
        gen.check_schema(options.json_schema)  # before any prefill
        return AnswerStream(self._decode(self.prepare_prompt(pieces, options, max_new_tokens=gen.max_new_tokens), gen))

    def prepare(
        self,
        question: str,
        passages: Sequence[Passage],
        options: QueryOptions | None = None,
        *,
        template: str = DEFAULT_QUESTION_TEMPLATE,
        max_new_tokens: int = 0,
        **overrides: Any,
    ) -> Prepared:
        """Everything up to the first token's logits: place, [reorder], score, select, recompute.

        ``max_new_tokens`` is checked against the context window, and the cache keeps room for that many tokens'
        K/V after the prompt's (decoding past it copies the cache once); ``overrides`` as for :meth:`answer`.
        """
        t0 = time.perf_counter()
        options = _only_options(options, overrides)
        check_text_list(passages, "passages")
        if not passages:
            raise ValueError("no passages: pass at least one passage (text or PassageKV) to answer over")
        block = encode_question(self.tokenizer, self.format, question, template)
        tail = torch.tensor(block.token_ids, dtype=torch.long)
        rows = block.question if options.score_rows == "question" else slice(0, len(tail))
        return query.run(self, list(passages), Prompt([], tail, rows), options, t0, max_new_tokens)

    def prepare_prompt(
        self,
        pieces: Sequence[str | PassageKV],
        options: QueryOptions | None = None,
        *,
        max_new_tokens: int = 0,
        **overrides: Any,
    ) -> Prepared:
        """Like :meth:`prepare` for a prompt given as pieces: fresh text and cached passages, in order.

        This is how a framework's ready-made prompt string is served: the caller found the cached passages
        inside it; everything else is computed fresh. The text after the last passage scores the context.
        """
        t0 = time.perf_counter()
        options = _only_options(options, overrides)
        check_text_list(pieces, "pieces")
        pieces = list(pieces)
        trailing = pieces.pop() if pieces and isinstance(pieces[-1], str) else ""
        tail = torch.tensor(encode(self.tokenizer, trailing + self.format.tail), dtype=torch.long)
        fresh = {
            i: torch.tensor(encode(self.tokenizer, p), dtype=torch.long)
            for i, p in enumerate(pieces)
            if isinstance(p, str)
        }
        kvs = [p for p in pieces if isinstance(p, PassageKV)]
        slots = [fresh.get(i) for i in range(len(pieces))]  # None marks a passage slot
        return query.run(self, kvs, Prompt(slots, tail, slice(0, len(tail))), options, t0, max_new_tokens)

    def decode(self, prep: Prepared, **generation: Any) -> AnswerResult:
        """Decode the answer from a :meth:`prepare`-d query (generation settings as in :meth:`answer`)."""
        return AnswerStream(self._decode(prep, GenerationConfig.of(generation))).finish()

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

    def _decode(self, prep: Prepared, gen: GenerationConfig):
        schema = prep.options.json_schema
        gen.check_schema(schema)
        constraint = None if schema is None else JsonConstraint(self.json_vocabulary, json_grammar(schema))
        return decoding.decode(self.model, self.tokenizer, self.eos_ids, prep, gen, self.compress, constraint)

    @functools.cached_property
    def json_vocabulary(self) -> Vocabulary:
        """The vocabulary for constrained decoding (``json_schema``), built on first use: it takes a second."""
        return grammar_vocabulary(self.tokenizer, self.eos_ids)

    def layout(self, passages: list[Segment], prompt: Prompt) -> Layout:
        """Passages into their slots (or back to back), fresh slot text between, the question block last."""
        remaining = iter(passages)
        ordered = [next(remaining) if ids is None else Segment(ids) for ids in prompt.slots] or list(remaining)
        # Only a passage right behind the prefix, prefilled right behind it, saw exactly its real left context.
        segments = [
            Segment(
                seg.token_ids,
                seg.kv,
                exact=i == 0 and seg.kv is not None and seg.kv.offset == len(self.prefix),
                passage=seg.passage,
            )
            for i, seg in enumerate(ordered)
        ]
        tail, rows = prompt.tail, prompt.query
        tail_start = len(self.prefix) + sum(len(seg) for seg in segments)
        segments.append(Segment(tail))
        return Layout(self.prefix, segments, tail[rows], tail_start + torch.arange(len(tail))[rows])

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
        gen = GenerationConfig.of(generation)
        ids = self.prompt_ids(question, passages, template)
        query.check_fits(len(ids), gen.max_new_tokens, self.max_positions)  # as every method's query is checked
        out = prefill.full_prefill(self.model, ids)
        tokens = generate_tokens(self.model, out.cache, out.logits, out.next_position, gen, self.eos_ids)
        return "".join(text_deltas(tokens, self.tokenizer, gen.stop)).strip(), out.logits


def _only_options(options: QueryOptions | None, overrides: dict[str, Any]) -> QueryOptions:
    options, rest = split_overrides(options, overrides)
    if rest:
        raise TypeError(f"unknown query options {sorted(rest)}; options are: {', '.join(QueryOptions.model_fields)}")
    return options


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    return {int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None}


__all__ = ["Engine"]
