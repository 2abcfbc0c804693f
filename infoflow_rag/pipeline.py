"""The one module that wires the parts: retriever (FAISS index) + KV store + engine.

Storage knows nothing of models, the engine nothing of storage; here a passage's text becomes a store
key (engine fingerprint + its token ids) and a missing KV is prefilled on the spot and stored.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .aio import finish_in_thread, iterate_in_thread, run_in_thread  # noqa: F401  (for the adapters)
from .chat import Conversations, Turn, render  # noqa: F401  (render: for the adapters)
from .closing import Closing
from .engine import Engine, QueryOptions
from .engine.options import split_overrides
from .engine.prompt import encode
from .engine.result import AnswerResult
from .errors import StoreUnavailableError
from .index.passage_index import META_FILE, RECORDS_FILE, Hit, PassageIndex
from .kv import PassageKV
from .matching import KnownPassage, PassageMatcher, RecentPassages  # noqa: F401  (RecentPassages: for the adapters)
from .models import DEFAULT_MODEL
from .pipeline_answer import PipelineAnswer, PipelineStream, ReuseStats  # the adapters import them from here
from .store import CacheKey, KVStore, check_store_spec, open_store
from .text import check_text

KV_DIR = "kv"
_FIRST_BUILD = threading.Lock()  # around a lazy first pipeline build (rare: one lock for every owner)

logger = logging.getLogger(__name__)


@dataclass
class KVLookup:
    kvs: list[PassageKV]
    fresh: list[bool]  # per passage: prefilled by this call (else served from the store, or a copy of a passage
    # earlier in the call, which reuses its KV)
    load_s: float  # reading from the store
    prefill_s: float

    @property
    def computed(self) -> int:
        return sum(self.fresh)

    @property
    def hits(self) -> int:
        return len(self.fresh) - self.computed


class Pipeline(Closing):
    """Safe to share between threads: the engine keeps every forward's state to itself, the stores lock."""

    def __init__(self, engine: Engine, store: KVStore, index: PassageIndex | None = None):
        self.engine, self.store, self.index = engine, store, index
        self.matcher = PassageMatcher((r.id, r.text) for r in index or ())
        # Passages registered without the index (framework ingestion), by id. Their ids are negative and the
        # index's positive (SQLite row ids), so a registered text can never take an indexed passage's id.
        self._texts: dict[int, str] = {}
        self._register_lock = threading.Lock()
        self._store_failures: set[str] = set()  # actions whose failure was already reported
        self.conversations = Conversations(self)  # shared by copies: they are its system-prompt variants

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        model: str | Engine = DEFAULT_MODEL,
        store: str | KVStore | None = None,
        create: bool = False,
        kv_dtype: str = "float32",
        engine_settings: dict[str, Any] | None = None,
        **index_options,
    ) -> Pipeline:
        """Open (or create) the index directory; the KV store defaults to ``<index_dir>/kv`` on disk.

        ``kv_dtype`` is how new KV is written (float32, float16, bfloat16, int8); reads accept any.
        ``engine_settings`` go to :class:`Engine` when ``model`` is a name (e.g. ``{"lead_in": None}``: passages right
        behind the prompt head instead of behind the default neutral lead-in). ``index_options`` (``kind``, and
        parameters such as ``M=32``) shape a new index; an existing one must already have them. ``embedder`` among
        them goes to the index either way (an existing index checks it is the one it was built with).
        """
        if isinstance(model, Engine) and engine_settings:
            raise ValueError(f"engine_settings {engine_settings} apply to a model name; this engine is built already")
        index_dir = Path(index_dir)
        # Records without index.json are a damaged index, not a missing one: open says how to repair it. Asked to
        # create, PassageIndex.create finishes a create killed before index.json if it stored no passage yet.
        has_index = (index_dir / META_FILE).exists() or (not create and (index_dir / RECORDS_FILE).exists())
        if not has_index and not create:
            raise FileNotFoundError(
                f"no passage index in {index_dir}; build one with: infoflow-rag ingest SOURCE --index {index_dir}"
            )
        if isinstance(store, str):
            check_store_spec(store)
        # Everything that can be refused without the model is, before it loads; what is opened is closed on failure.
        with contextlib.ExitStack() as opened:
            index = None
            if not has_index:
                with contextlib.suppress(FileExistsError):  # made since the check, by another process: open it
                    index = opened.enter_context(PassageIndex.create(index_dir, **index_options))
            if index is None:
                shape = dict(index_options)
                index = opened.enter_context(PassageIndex.open(index_dir, shape.pop("embedder", None)))
                index.check_same_spec(**shape)
            if store is None or isinstance(store, str):
                store = opened.enter_context(open_store(store or f"disk:{index_dir / KV_DIR}", dtype=kv_dtype))
            index.embedder.encode(["warm-up"])  # load the embedder now: a query's retrieval time is then a search
            engine = model if isinstance(model, Engine) else Engine.load(model, **(engine_settings or {}))
            pipeline = cls(engine, store, index)
            opened.pop_all()
        return pipeline

    @classmethod
    def from_model(cls, model: str | Engine = DEFAULT_MODEL, store: str | KVStore = "memory") -> Pipeline:
        """A pipeline without a passage index (framework use: passages are registered or sent): the engine
        loaded (and checked) from ``model``, KV in ``store`` (``memory[:SIZE]``, ``disk:DIR``, ``redis://...``)."""
        if isinstance(store, str):
            check_store_spec(store)  # before the model loads
        engine = model if isinstance(model, Engine) else Engine.load(model)
        return cls(engine, open_store(store) if isinstance(store, str) else store)

    @property
    def model_name(self) -> str:
        """The name of the model answering (what an adapter reports as its model)."""
        return self.engine.loaded.name

    @property
    def context_window(self) -> int:
        return self.engine.max_positions

    def close(self) -> None:
        self.store.close()
        if self.index is not None:
            self.index.close()

    # --- KV ---------------------------------------------------------------------------------------------

    def key(self, token_ids: Sequence[int] | torch.Tensor) -> CacheKey:
        return CacheKey.for_tokens(self.engine.fingerprint, token_ids)

    def kv_for(self, texts: Sequence[str], progress: bool = False) -> KVLookup:
        """KV of each passage: from the store, or prefilled now and stored (then served from the store)."""
        t = time.perf_counter()
        ids = [self.engine.passage_ids(text) for text in texts]
        keys = [self.key(token_ids) for token_ids in ids]
        expected = dict(zip(keys, ids, strict=True))
        try:  # an entry that is not this passage's KV (other tokens, shapes, prefix) is dropped and recomputed
            found = self.store.get_many(keys, check=lambda key, kv: self.engine.kv_problem(kv, expected[key]))
        except StoreUnavailableError as e:
            self._report_once("read", e)
            found = [None] * len(keys)
        load_s = time.perf_counter() - t
        # A passage the store lacks is prefilled once, however often it comes (boilerplate repeated across the
        # files of one ingest batch was prefilled and written once per copy); its copies reuse that KV.
        first: dict[CacheKey, int] = {}  # each missing passage's first place in ``texts``
        for i, key in enumerate(keys):
            if found[i] is None:
                first.setdefault(key, i)
        fresh = [first.get(key) == i for i, key in enumerate(keys)]
        missing = sorted(first.values())
        prefill_s = 0.0
        if missing:
            t = time.perf_counter()
            computed = dict(
                zip(missing, self.engine.prefill([texts[i] for i in missing], progress=progress), strict=True)
            )
            try:
                self.store.put_many((keys[i], kv) for i, kv in computed.items())
            except StoreUnavailableError as e:  # the computed KV still serves this call
                self._report_once("write", e)
            for i, key in enumerate(keys):
                if found[i] is None:
                    found[i] = computed[first[key]]
            prefill_s = time.perf_counter() - t
        return KVLookup(found, fresh, load_s, prefill_s)

    def _report_once(self, action: str, error: StoreUnavailableError) -> None:
        """The store is a cache: a failure costs a prefill (read) or a later one (write), and is said once."""
        if action not in self._store_failures:
            self._store_failures.add(action)
            effect = "passages are prefilled instead" if action == "read" else "KV is not kept for reuse"
            logger.warning("KV store %s failed, %s (reported once): %s", action, effect, error)

    def register(self, texts: Sequence[str], progress: bool = False) -> KVLookup:
        """Make passages recognisable inside prompts and make sure their KV is stored (framework ingestion)."""
        lookup = self.kv_for(texts, progress=progress)  # first: a passage that cannot be served is refused here
        with self._register_lock:  # concurrent registrations must not hand out one id twice
            known = set(self._texts.values())
            new = [text for text in dict.fromkeys(texts) if text not in known]
            first = len(self._texts) + 1
            registered = [(-(first + i), text) for i, text in enumerate(new)]
            self._texts.update(registered)
            self.matcher.add(registered)
        return lookup

    # --- answering --------------------------------------------------------------------------------------

    def retrieve(self, question: str, top_k: int = 5) -> list[Hit]:
        if self.index is None:
            raise ValueError("this pipeline has no passage index: open one with Pipeline.open(index_dir)")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        check_text(question, "the question")  # named here: the embedder would only know "text 0"
        return self.index.search(question, top_k)  # at most the index size: a huge top_k allocates nothing

    def ask(
        self, question: str, top_k: int = 5, options: QueryOptions | None = None, **overrides: Any
    ) -> PipelineAnswer:
        """Retrieve top_k passages, load (or prefill) their KV, answer. ``options`` and keyword overrides as for
        :meth:`Engine.answer`."""
        return self.stream(question, top_k, options, **overrides).finish()

    def stream(
        self, question: str, top_k: int = 5, options: QueryOptions | None = None, **overrides: Any
    ) -> PipelineStream:
        t = time.perf_counter()
        hits = self.retrieve(question, top_k)
        retrieve_s = time.perf_counter() - t
        if not hits:  # the index is empty: say so, not the engine's "no passages" meant for a caller's own list
            raise ValueError(
                f"the index at {self.index.directory} holds no passages; add some first: "
                f"infoflow-rag ingest SOURCE --index {self.index.directory}"
            )
        texts = [h.text for h in hits]
        return self.stream_passages(question, texts, hits, retrieve_s, options, **overrides)

    def stream_passages(
        self,
        question: str,
        passages: Sequence[str],
        sources: Sequence[Hit] = (),
        retrieve_s: float = 0.0,
        options: QueryOptions | None = None,
        **overrides: Any,
    ) -> PipelineStream:
        """Answer over given passage texts (kept as separate passages), their KV from the store."""
        options, generation = split_overrides(options, overrides)
        # "full" recomputes every passage token: it needs no stored KV, and is the uncached reference.
        lookup = self.kv_for(passages) if options.selector != "full" else None
        stream = self.engine.stream(question, lookup.kvs if lookup else list(passages), options, **generation)

        def make(result: AnswerResult) -> PipelineAnswer:
            _account(result, retrieve_s, lookup)
            # Every passage token starts from cached KV when the store served it (recompute refreshes some).
            stored = sum(len(kv) for kv, new in zip(lookup.kvs, lookup.fresh, strict=True) if not new) if lookup else 0
            reuse = _reuse(lookup, result.context_tokens, result, stored)
            return PipelineAnswer(result.answer, list(sources), result, reuse)

        return PipelineStream(stream, make)

    def answer_prompt(self, prompt: str, options: QueryOptions | None = None, **overrides: Any) -> PipelineAnswer:
        return self.stream_prompt(prompt, options, **overrides).finish()

    def stream_prompt(
        self, prompt: str, options: QueryOptions | None = None, known: Sequence[str] = (), **overrides: Any
    ) -> PipelineStream:
        """Serve a ready-made prompt: known passages inside it reuse their KV, the rest is computed fresh.

        ``known``: more passage texts the prompt may quote (what a framework retrieved for it); any of them
        found is prefilled and stored on first sight, and reused from then on."""
        return self.stream_pieces(self.split_prompt(prompt, known), (), 0.0, options, **overrides)

    def stream_chat(
        self,
        turns: Sequence[Turn],
        passages: Sequence[str] = (),
        options: QueryOptions | None = None,
        known: Sequence[str] = (),
        **overrides: Any,
    ) -> PipelineStream:
        """Answer a conversation (system, user and assistant turns, the user's last) through the model's chat
        template; known passages in any user turn reuse their KV (``known`` as for :meth:`stream_prompt`),
        ``passages`` go first in the last turn."""
        pipeline, pieces = self.conversations.pieces(turns, passages, known)
        return pipeline.stream_pieces(pieces, (), 0.0, options, **overrides)

    def split_prompt(self, prompt: str, known: Sequence[str] = ()) -> list[str | KnownPassage]:
        """The prompt as fresh text and the known passages (indexed, registered or in ``known``) found in it,
        in prompt order."""
        pieces: list[str | KnownPassage] = []
        pos = 0
        for m in self.matcher.find(prompt, PassageMatcher(enumerate(known))):
            if m.start > pos:
                pieces.append(prompt[pos : m.start])
            pieces.append(KnownPassage(prompt[m.start : m.end]))
            pos = m.end
        if pos < len(prompt):
            pieces.append(prompt[pos:])
        return pieces

    def stream_pieces(
        self,
        pieces: Sequence[str | KnownPassage],
        sources: Sequence[Hit] = (),
        retrieve_s: float = 0.0,
        options: QueryOptions | None = None,
        **overrides: Any,
    ) -> PipelineStream:
        """Serve a prompt given as fresh text and passages: each passage's KV from the store (prefilled if missing).

        The engine wraps the pieces in its prompt head and tail, as one user turn's content.
        """
        texts = [p.text for p in pieces if isinstance(p, KnownPassage)]
        lookup = self.kv_for(texts) if texts else None
        found = iter(zip(lookup.kvs, lookup.fresh, strict=True) if lookup else [])
        resolved: list[str | PassageKV] = []
        stored = 0  # passage tokens whose KV the store already held before this call
        for piece in pieces:
            if isinstance(piece, str):
                resolved.append(piece)
                continue
            kv, new = next(found)
            resolved.append(head := self._head(kv, piece.text))
            if isinstance(head, PassageKV) and not new:
                stored += len(head)
        stream = self.engine.stream_prompt(resolved, options, **overrides)

        def make(result: AnswerResult) -> PipelineAnswer:
            _account(result, retrieve_s, lookup)
            reused = sum(len(p) for p in resolved if isinstance(p, PassageKV))
            return PipelineAnswer(result.answer, list(sources), result, _reuse(lookup, reused, result, stored))

        return PipelineStream(stream, make)

    def _head(self, kv: PassageKV, text: str) -> PassageKV | str:
        """The cached tokens of ``text`` as it appears in a prompt: the stored KV minus its separator tokens.

        A causal prefill's first n tokens do not depend on what follows, so a head slice is still exact.
        Returns the text itself (computed fresh) if the text's tokens are not a prefix of the stored ones.
        """
        ids = encode(self.engine.tokenizer, text)
        if kv.token_ids[: len(ids)].tolist() != list(ids):
            return text
        return kv.head(len(ids))


def _reuse(lookup: KVLookup | None, reused_tokens: int, result: AnswerResult, stored_tokens: int) -> ReuseStats:
    if lookup is None:  # nothing cached was used
        return ReuseStats(0, 0, 0, result.prompt_tokens)
    return ReuseStats(lookup.hits, lookup.computed, reused_tokens, result.prompt_tokens, stored_tokens)


def _account(result: AnswerResult, retrieve_s: float, lookup: KVLookup | None) -> None:
    """Fold retrieval and KV loading into the engine's timings, so TTFT counts from the question."""
    timings = result.timings
    timings.retrieve = retrieve_s
    timings.ttft += retrieve_s
    if lookup is not None:
        timings.load_kv = lookup.load_s
        timings.prefill += lookup.prefill_s
        timings.ttft += lookup.load_s + lookup.prefill_s


def built_on_first_use(owner: Any, attribute: str, model: str) -> Pipeline:
    """``owner.<attribute>``, set to ``Pipeline.from_model(model)`` on first use: the adapters' lazy pipeline.
    Concurrent first calls (a batch, gathered async calls) build one, not one model load each."""
    if getattr(owner, attribute) is None:
        with _FIRST_BUILD:
            if getattr(owner, attribute) is None:
                setattr(owner, attribute, Pipeline.from_model(model))
    return getattr(owner, attribute)
