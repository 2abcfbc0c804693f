"""LlamaIndex integration: stock query engines over the ingestion hook reuse passage KV (tiny model)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

import faiss
import numpy as np
import pytest
from conftest import (
    PASSAGES,
    QUESTION,
    TICKED_ANSWER_TOKENS,
    chat_template,
    loop_ran_free,
    overlap,
    pipelines_built_by_concurrent_first_calls,
    record_prompts,
    ticks_while,
)
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage, CompletionResponse
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.prompts import PromptTemplate
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import get_response_synthesizer
from llama_index.core.schema import MetadataMode
from llama_index.llms.infoflow import STATS_KEY, InfoFlowEmbedding, InfoFlowKVCacheTransform, InfoFlowLLM
from llama_index.vector_stores.faiss import FaissVectorStore
from pydantic import ValidationError
from test_index import BagOfWordsEmbedder

from infoflow_rag.engine import Engine
from infoflow_rag.engine.lead_in import NEUTRAL_LEAD_IN
from infoflow_rag.engine.prompt import encode
from infoflow_rag.index.passage_index import PassageIndex
from infoflow_rag.pipeline import Pipeline
from infoflow_rag.store import open_store

EMBED_DIM = 8
MAX_NEW_TOKENS = 8


class CompletionLog(BaseEventHandler):
    """The (prompt, response) pairs of every LLM completion, read from LlamaIndex instrumentation."""

    calls: list[tuple[str, CompletionResponse]] = []

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMCompletionEndEvent):
            self.calls.append((event.prompt, event.response))


@pytest.fixture
def completions():
    log = CompletionLog(calls=[])
    root = get_dispatcher()
    root.add_event_handler(log)
    yield log.calls
    root.event_handlers.remove(log)


@pytest.fixture
def pipeline(engine) -> Pipeline:
    return Pipeline(engine, open_store("memory"))


def documents() -> list[Document]:
    # Metadata, an excluded key, stray whitespace: the registered text must still be what the prompt quotes.
    return [
        Document(
            text=f"  {text}\n",
            metadata={"title": f"fact {i}", "internal_id": i},
            excluded_llm_metadata_keys=["internal_id"],
        )
        for i, text in enumerate(PASSAGES)
    ]


def registered_texts() -> list[str]:
    """What the ingestion hook registers, and a synthesizer quotes, for each of :func:`documents`."""
    return [doc.get_content(metadata_mode=MetadataMode.LLM).strip() for doc in documents()]


def embed_model() -> MockEmbedding:
    return MockEmbedding(embed_dim=EMBED_DIM)  # one constant vector: every node ties, top_k takes any


def ingested_index(pipeline: Pipeline) -> VectorStoreIndex:
    return VectorStoreIndex.from_documents(
        documents(), embed_model=embed_model(), transformations=[InfoFlowKVCacheTransform(pipeline)]
    )


def llm(pipeline: Pipeline, **fields) -> InfoFlowLLM:
    return InfoFlowLLM(pipeline=pipeline, max_new_tokens=MAX_NEW_TOKENS, **fields)


def test_stock_query_engine_reuses_the_ingested_passages_kv(pipeline, completions):
    index = ingested_index(pipeline)
    response = index.as_query_engine(llm=llm(pipeline), similarity_top_k=len(PASSAGES)).query(QUESTION)

    [(prompt, completion)] = completions
    stats = completion.raw[STATS_KEY]
    assert response.response == completion.text
    assert stats["passages_hit"] == len(PASSAGES) and stats["passages_computed"] == 0
    assert 0 < stats["reused_share"] < 1 and stats["reused_tokens"] == stats["context_tokens"]
    assert 0 < stats["recompute_fraction"] <= 0.16 and stats["ttft"] > 0
    assert stats["finish_reason"] == ("length" if stats["generated_tokens"] == MAX_NEW_TOKENS else "stop")
    assert completion.raw["reuse"]["reused_tokens"] == stats["reused_tokens"]
    assert all(f"\n{text}\n" in prompt for text in registered_texts())
    assert "\ntitle: fact 2\n\n  The capital of Australia" in prompt and "internal_id" not in prompt


def test_a_span_whose_passages_cannot_be_read_is_logged_not_dropped(pipeline, caplog):
    """LlamaIndex's dispatcher swallows what a span handler raises; ours says so instead."""
    from llama_index.llms.infoflow.passages import PassageSpans

    class Synthesizer:  # what a synthesis span carries: the synthesizer (with its LLM) and the nodes
        _llm = llm(pipeline)

    bound = inspect.signature(lambda nodes: None).bind(nodes=[object()])  # not a NodeWithScore
    with caplog.at_level(logging.WARNING, logger="llama_index.llms.infoflow.passages"):
        PassageSpans().new_span("span-1", bound, instance=Synthesizer())
    assert "could not read the passages of a LlamaIndex Synthesizer span" in caplog.text
    assert "AttributeError" in caplog.text  # the cause, with its traceback
    assert Synthesizer._llm.recent_passages.texts() == []


def test_full_recompute_gives_the_uncached_answer(pipeline, engine, completions):
    index = ingested_index(pipeline)
    uncached_pipeline = Pipeline(engine, open_store("memory"))  # nothing registered: the plain path
    answers = [
        index.as_query_engine(llm=llm(p, selector="full")).query(QUESTION).response
        for p in (pipeline, uncached_pipeline)
    ]
    (cached_prompt, cached), (uncached_prompt, uncached) = completions
    assert cached_prompt == uncached_prompt
    assert cached.raw[STATS_KEY]["passages_hit"] == 2
    assert uncached.raw[STATS_KEY]["reused_share"] == 0
    assert answers[0] == answers[1] != ""


def test_a_lead_in_pipeline_serves_the_stock_query_engine_and_at_full_recompute_gives_the_uncached_answer(
    engine, completions
):
    lead_pipeline = Pipeline(engine.replace(lead_in=NEUTRAL_LEAD_IN), open_store("memory"))
    uncached_pipeline = Pipeline(engine, open_store("memory"))
    index = ingested_index(lead_pipeline)  # the ingestion hook prefills behind the lead-in
    answers = [
        index.as_query_engine(llm=llm(lead_pipeline, selector="sinkflow", ratio=1.0)).query(QUESTION).response,
        index.as_query_engine(llm=llm(uncached_pipeline, selector="full")).query(QUESTION).response,
    ]
    (lead_prompt, lead), (uncached_prompt, _) = completions
    assert lead_prompt == uncached_prompt and lead.raw[STATS_KEY]["passages_hit"] == 2
    assert answers[0] == answers[1] != ""


def test_prompt_without_known_passages_reports_no_reuse(pipeline):
    ingested_index(pipeline)
    response = llm(pipeline).complete("Name a river in Europe.")
    stats = response.raw[STATS_KEY]
    assert stats["passages_hit"] == stats["passages_computed"] == stats["reused_tokens"] == 0
    assert stats["reused_share"] == 0 and stats["generated_tokens"] >= 1
    assert response.raw["answer"] == response.text


def test_streaming_query_engine_and_stream_complete(pipeline, completions):
    index = ingested_index(pipeline)
    answer = index.as_query_engine(llm=llm(pipeline)).query(QUESTION).response
    streamed = index.as_query_engine(llm=llm(pipeline), streaming=True).query(QUESTION)
    deltas = list(streamed.response_gen)
    assert len(deltas) > 1 and "".join(deltas).strip() == answer

    prompt = completions[0][0]
    responses = list(llm(pipeline).stream_complete(prompt))
    last = responses[-1]
    assert last.text == "".join(r.delta or "" for r in responses)
    assert last.raw[STATS_KEY]["passages_hit"] == 2  # as_query_engine retrieves 2 by default
    assert all(r.raw is None for r in responses[:-1])


def test_retriever_query_engine_over_faiss_with_an_ingestion_pipeline(pipeline, completions):
    nodes = IngestionPipeline(
        transformations=[SentenceSplitter(chunk_size=64, chunk_overlap=0), InfoFlowKVCacheTransform(pipeline)]
    ).run(documents=documents())
    storage = StorageContext.from_defaults(vector_store=FaissVectorStore(faiss_index=faiss.IndexFlatL2(EMBED_DIM)))
    index = VectorStoreIndex(nodes, storage_context=storage, embed_model=embed_model())
    query_engine = RetrieverQueryEngine.from_args(index.as_retriever(similarity_top_k=3), llm=llm(pipeline))
    response = query_engine.query(QUESTION)
    stats = completions[0][1].raw[STATS_KEY]
    assert stats["passages_hit"] == 3 and stats["reused_share"] > 0
    assert len(response.source_nodes) == 3


CONVERSATION = [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another?")]


def test_chat_is_the_model_chat_template_of_all_turns(pipeline, engine, monkeypatch):
    prompts = record_prompts(monkeypatch)
    model = llm(pipeline)
    response = model.chat([ChatMessage(role=role, content=text) for role, text in CONVERSATION])
    assert prompts == [chat_template(engine, CONVERSATION)]  # not 'system: ...\nuser: ...' in one user turn
    assert response.raw["usage"]["prompt_tokens"] == len(encode(engine.tokenizer, prompts[0]))
    assert response.message.role == "assistant" and response.message.additional_kwargs == {}
    streamed = list(model.stream_chat([ChatMessage(role=role, content=text) for role, text in CONVERSATION]))
    assert prompts[1] == prompts[0] and streamed[-1].message.content.strip() == response.message.content
    assert streamed[-1].raw[STATS_KEY]["generated_tokens"] >= 1 and all(r.raw is None for r in streamed[:-1])


def test_chat_finds_passages_in_any_user_turn(pipeline):
    ingested_index(pipeline)
    history = [ChatMessage(role="user", content="Facts:\n" + "\n\n".join(registered_texts()))]
    history += [ChatMessage(role="assistant", content="Noted."), ChatMessage(role="user", content=QUESTION)]
    response = llm(pipeline).chat(history)
    assert response.raw[STATS_KEY]["passages_hit"] == len(PASSAGES)
    assert response.raw["usage"]["cache_read"] == response.raw[STATS_KEY]["stored_tokens"] > 0
    assert response.raw["usage"]["cache_creation"] == 0


def test_stats_stay_out_of_the_next_turn_of_a_chat_engine(pipeline, engine, monkeypatch):
    prompts = record_prompts(monkeypatch)
    memory = ChatMemoryBuffer.from_defaults(token_limit=10_000, tokenizer_fn=str.split)
    chat_engine = SimpleChatEngine.from_defaults(llm=llm(pipeline), memory=memory)
    first = chat_engine.chat("Name a colour.").response
    chat_engine.chat("Another?")
    expected = [("user", "Name a colour."), ("assistant", first), ("user", "Another?")]
    assert prompts[1] == chat_template(engine, expected)
    assert "passages_hit" not in prompts[1] and STATS_KEY not in prompts[1]


def test_usage_says_what_came_from_the_store_and_what_this_call_prefilled(engine, tmp_path):
    index = PassageIndex.create(tmp_path / "index", embedder=BagOfWordsEmbedder())
    index.add_passages(PASSAGES)
    pipeline = Pipeline(engine, open_store("memory"), index)  # every passage known, none stored
    pipeline.kv_for(PASSAGES[:1])  # the first is stored; the call prefills the rest
    prompt = "Facts:\n" + "\n\n".join(PASSAGES)
    usage = llm(pipeline).complete(prompt).raw["usage"]
    first, rest = (
        len(encode(engine.tokenizer, PASSAGES[0])),
        sum(len(encode(engine.tokenizer, p)) for p in PASSAGES[1:]),
    )
    assert (usage["cache_read"], usage["cache_creation"]) == (first, rest)
    assert llm(pipeline).complete(prompt).raw["usage"]["cache_read"] == first + rest


class EndEvents(BaseEventHandler):
    """How many completion and chat end events LlamaIndex instrumentation saw."""

    counts: dict[str, int] = {}

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMCompletionEndEvent | LLMChatEndEvent):
            self.counts[type(event).__name__] = self.counts.get(type(event).__name__, 0) + 1


def test_async_runs_off_the_event_loop_with_one_event_and_true_token_counts(pipeline, engine):
    ingested_index(pipeline)
    prompt = "Facts:\n" + "\n\n".join(registered_texts()) + "\n\nTell me everything."
    counter = TokenCountingHandler(tokenizer=str.split)
    model = InfoFlowLLM(
        pipeline=pipeline, max_new_tokens=TICKED_ANSWER_TOKENS, callback_manager=CallbackManager([counter])
    )
    messages = [ChatMessage(role="user", content=prompt)]
    events = EndEvents(counts={})
    get_dispatcher().add_event_handler(events)

    async def drain(stream) -> list:
        return [r async for r in await stream]

    try:
        completed = model.complete(prompt)
        for call in (model.acomplete(prompt), drain(model.astream_complete(prompt))):
            ticks, elapsed = asyncio.run(ticks_while(call))
            assert loop_ran_free(ticks, elapsed)
        chatted = asyncio.run(model.achat(messages))
        streamed = asyncio.run(drain(model.astream_chat(messages)))
        assert asyncio.run(overlap(model.acomplete(prompt), model.acomplete(prompt)))
    finally:
        get_dispatcher().event_handlers.remove(events)
    assert events.counts == {"LLMCompletionEndEvent": 5, "LLMChatEndEvent": 2}  # one per call
    assert streamed[-1].message.content.strip() == chatted.message.content == completed.text
    assert chatted.raw[STATS_KEY]["passages_hit"] == len(PASSAGES)
    prompt_tokens = completed.raw["usage"]["prompt_tokens"]
    assert chatted.raw["usage"]["prompt_tokens"] == prompt_tokens  # one user turn either way
    assert counter.prompt_llm_token_count == 7 * prompt_tokens  # counted once per call, sync or async


def test_aquery_of_a_stock_query_engine_leaves_the_event_loop_running(pipeline):
    index = ingested_index(pipeline)
    query_engine = index.as_query_engine(llm=InfoFlowLLM(pipeline=pipeline, max_new_tokens=TICKED_ANSWER_TOKENS))
    ticks, elapsed = asyncio.run(ticks_while(query_engine.aquery(QUESTION)))
    assert loop_ran_free(ticks, elapsed)  # the issue: 0 ticks in a 2.2 s aquery


def test_metadata_and_fields(pipeline, engine):
    model = llm(pipeline, reorder=True, ratio=0.3)
    meta = model.metadata
    assert meta.context_window == engine.max_positions and meta.num_output == MAX_NEW_TOKENS
    assert meta.model_name == model.model == "tiny-llama" and not meta.is_chat_model
    assert model.pipeline is pipeline
    stats = model.complete(PASSAGES[2]).raw[STATS_KEY]
    assert stats["ratio"] == 0.3 and stats["compress"] == "none"
    squeezed = llm(pipeline, compress="infokv", keep=0.5).complete(PASSAGES[2]).raw[STATS_KEY]
    assert squeezed["compress"] == "infokv"
    assert squeezed["kv_tokens"] == stats["kv_tokens"] - (stats["context_tokens"] - int(0.5 * stats["context_tokens"]))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"selector": "bogus"}, "unknown selector 'bogus'"),
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\], got 0.0"),  # QueryOptions' own check
        ({"max_new_tokens": 0}, "greater than or equal to 1"),
        ({"compress": "zip"}, "unknown compression policy 'zip'"),
        ({"keep": 1.5}, r"keep=1.5 as a ratio must be in \(0, 1\]"),
    ],
)
def test_bad_fields_are_rejected_at_construction(pipeline, fields, message):
    with pytest.raises(ValidationError, match=message):
        InfoFlowLLM(pipeline=pipeline, **fields)


def test_model_must_match_the_given_pipeline(pipeline):
    with pytest.raises(ValueError, match="model='smollm2-135m' but the given pipeline serves 'tiny-llama'"):
        InfoFlowLLM(pipeline=pipeline, model="smollm2-135m")


def test_transform_returns_nodes_unchanged_and_skips_empty_text(pipeline):
    nodes = [Document(text=PASSAGES[0]), Document(text="  \n")]
    assert InfoFlowKVCacheTransform(pipeline)(nodes) is nodes
    answer = pipeline.answer_prompt(f"Read:\n{PASSAGES[0]}\n\nWhat rises in the Alps?", max_new_tokens=2)
    assert answer.reuse.passages_hit == 1


def second_query_reuse(pipeline: Pipeline, completions: list, **engine_args) -> list[tuple[int, int]]:
    """Ask a stock query engine over an index built with no ingestion hook the same question twice; the
    (passages hit, computed now) of every LLM call of the second query."""
    index = VectorStoreIndex.from_documents(documents(), embed_model=embed_model())
    first = index.as_query_engine(llm=llm(pipeline), similarity_top_k=len(PASSAGES), **engine_args)
    first.query(QUESTION)
    calls = len(completions)
    assert all(c.raw[STATS_KEY]["passages_hit"] == 0 for _, c in completions)  # a fresh store
    assert sum(c.raw[STATS_KEY]["passages_computed"] for _, c in completions) >= 1  # ... filled on first sight
    first.query(QUESTION)
    return [(c.raw[STATS_KEY]["passages_hit"], c.raw[STATS_KEY]["passages_computed"]) for _, c in completions[calls:]]


INLINE = PromptTemplate("Notes: {context_str} Question: {query_str} Answer: ")


@pytest.mark.parametrize(
    ("engine_args", "hits"),
    [
        ({"response_mode": "compact"}, [4]),  # every node verbatim in one prompt
        ({"response_mode": "refine"}, [1, 1, 1, 1]),  # one prompt per node
        ({"response_mode": "tree_summarize"}, [4]),
        ({"response_mode": "simple_summarize"}, [1]),  # the prompt quotes a list repr: one passage of its own
        ({"text_qa_template": INLINE}, [4]),  # the first node not at a line start
    ],
    ids=["compact", "refine", "tree_summarize", "simple_summarize", "inline_template"],
)
def test_stock_index_without_ingestion_reuses_on_the_second_query(pipeline, completions, engine_args, hits):
    assert second_query_reuse(pipeline, completions, **engine_args) == [(n, 0) for n in hits]


def test_passages_the_prompt_helper_cuts_are_reused_by_their_pieces(pipeline, completions):
    # Chunks of at most 24 (whitespace) tokens: repack cuts the nodes apart and across prompts.
    helper = PromptHelper(context_window=4096, num_output=MAX_NEW_TOKENS, chunk_size_limit=24, tokenizer=str.split)
    synthesizer = get_response_synthesizer(llm=llm(pipeline), response_mode="compact", prompt_helper=helper)
    reuse = second_query_reuse(pipeline, completions, response_synthesizer=synthesizer)
    assert len(reuse) > 1 and all(hit >= 1 and computed == 0 for hit, computed in reuse)


def test_a_context_chat_engine_reuses_its_retrieved_nodes(pipeline, completions):
    index = VectorStoreIndex.from_documents(documents(), embed_model=embed_model())
    model = llm(pipeline)
    for _ in range(2):  # a new chat engine each time: the same prompt, no history
        index.as_chat_engine(chat_mode="context", llm=model, similarity_top_k=len(PASSAGES)).chat(QUESTION)
    assert [c.raw[STATS_KEY]["passages_hit"] for _, c in completions] == [0, len(PASSAGES)]


FACTS = [
    "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "Mount Kilimanjaro, in Tanzania, is the highest mountain in Africa.",
    "The telephone was invented by Alexander Graham Bell, who was born in Edinburgh.",
]


def test_async_embeddings_leave_the_event_loop_free(monkeypatch):
    embedding = InfoFlowEmbedding()

    def slow(texts, batch_size=64, show_progress=False):  # as long as MiniLM takes on a large batch
        time.sleep(0.3)
        return np.ones((len(texts), 4), dtype=np.float32)

    monkeypatch.setattr(embedding._embedder, "encode", slow)

    async def embed_while_ticking():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        vectors = await embedding.aget_text_embedding_batch(["a", "b"])
        query = await embedding.aget_query_embedding("q")
        ticker.cancel()
        return ticks, vectors, query

    ticks, vectors, query = asyncio.run(embed_while_ticking())
    assert len(vectors) == 2 and len(query) == 4
    assert ticks > 20  # 0.6 s of embedding; with the loop blocked it ticked once or twice


@pytest.fixture(scope="module")
def smollm() -> Engine:
    return Engine.load("smollm2-135m")


@pytest.mark.real_model
def test_smollm_query_engine_reuses_kv_and_names_the_fact(smollm, completions):
    pipeline = Pipeline(smollm, open_store("memory"))
    index = VectorStoreIndex.from_documents(
        [Document(text=t) for t in FACTS],
        embed_model=InfoFlowEmbedding(),
        transformations=[InfoFlowKVCacheTransform(pipeline)],
    )
    query_engine = index.as_query_engine(llm=InfoFlowLLM(pipeline=pipeline, max_new_tokens=24), similarity_top_k=3)
    response = query_engine.query("When was the Eiffel Tower completed?")
    stats = completions[0][1].raw[STATS_KEY]
    assert response.source_nodes[0].node.text == FACTS[0]  # the offline MiniLM ranks the asked-about fact first
    assert "1889" in response.response
    assert stats["passages_hit"] == 3 and stats["reused_share"] > 0.3 and stats["recompute_fraction"] <= 0.16


@pytest.mark.real_model
def test_smollm_over_an_index_with_no_ingestion_step_reuses_in_every_response_mode(smollm, completions):
    index = VectorStoreIndex.from_documents([Document(text=t) for t in FACTS], embed_model=InfoFlowEmbedding())
    modes = ("compact", "refine", "tree_summarize", "simple_summarize")
    for engine_args in [*({"response_mode": m} for m in modes), {"text_qa_template": INLINE}]:
        pipeline = Pipeline(smollm, open_store("memory"))  # a fresh store per mode
        model = InfoFlowLLM(pipeline=pipeline, max_new_tokens=24)
        query_engine = index.as_query_engine(llm=model, similarity_top_k=3, **engine_args)
        answers = [query_engine.query("When was the Eiffel Tower completed?").response for _ in range(2)]
        second = [c.raw[STATS_KEY] for _, c in completions[len(completions) // 2 :]]
        completions.clear()
        assert answers[0] == answers[1] and "1889" in answers[0], engine_args
        assert all(s["passages_hit"] >= 1 and s["passages_computed"] == 0 for s in second), engine_args


def test_concurrent_first_calls_build_one_pipeline(monkeypatch):
    llm = InfoFlowLLM()
    assert pipelines_built_by_concurrent_first_calls(monkeypatch, lambda: llm.pipeline) == (1, 1)
