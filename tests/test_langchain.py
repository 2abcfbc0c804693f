"""LangChain integration: chat model, retriever and RAG chain over an infoflow-rag pipeline (tiny model)."""

from __future__ import annotations

import asyncio
from pathlib import Path

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
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    SystemMessageChunk,
    ToolMessage,
)
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_infoflow import ChatInfoFlow, InfoFlowRetriever, create_infoflow_rag_chain, messages_to_turns
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import ValidationError
from test_index import BagOfWordsEmbedder

from infoflow_rag.engine import Engine, QueryOptions
from infoflow_rag.engine.lead_in import NEUTRAL_LEAD_IN
from infoflow_rag.engine.prompt import encode
from infoflow_rag.index.passage_index import PassageIndex
from infoflow_rag.pipeline import Pipeline
from infoflow_rag.store import open_store

MAX_TOKENS = 8
CAPITAL = PASSAGES[2]  # the passage that answers QUESTION
PROMPT = ChatPromptTemplate.from_messages(
    [("system", "Answer from the context."), ("human", "Context:\n{context}\n\nQuestion: {question}")]
)


@pytest.fixture(scope="module")
def tiny_pipeline(engine) -> Pipeline:
    return Pipeline(engine, open_store("memory"))


@pytest.fixture
def pipeline(engine, tmp_path: Path) -> Pipeline:
    """A fresh KV store over the four PASSAGES, indexed with an instant bag-of-words embedder."""
    index = PassageIndex.create(tmp_path / "index", embedder=BagOfWordsEmbedder())
    index.add_passages(PASSAGES, sources=[f"doc{i}.txt" for i in range(len(PASSAGES))])
    return Pipeline(engine, open_store("memory"), index)


def chat(pipeline: Pipeline, **fields) -> ChatInfoFlow:
    return ChatInfoFlow(pipeline=pipeline, max_tokens=MAX_TOKENS, **fields)


class TestChatInfoFlowStandard(ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _use_tiny_pipeline(self, tiny_pipeline: Pipeline) -> None:
        self.tiny_pipeline = tiny_pipeline

    @property
    def chat_model_class(self) -> type[ChatInfoFlow]:
        return ChatInfoFlow

    @property
    def chat_model_params(self) -> dict:
        return {"pipeline": self.tiny_pipeline}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return True  # constrained decoding (tests/test_structured.py)

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatInfoFlow serves the one model its pipeline loaded


def test_retriever_returns_scored_documents(pipeline):
    docs = InfoFlowRetriever(index=pipeline.index, k=2).invoke(QUESTION)
    assert len(docs) == 2 and docs[0].page_content == CAPITAL
    assert docs[0].metadata == {
        "id": 3,
        "score": pytest.approx(docs[0].metadata["score"]),
        "source": "doc2.txt",
    }
    assert docs[0].metadata["score"] > docs[1].metadata["score"] and docs[0].id == "3"


def test_retriever_takes_k_per_call_as_langchains_own_do(pipeline):
    retriever = InfoFlowRetriever(index=pipeline.index, k=3)
    assert len(retriever.invoke(QUESTION)) == 3
    assert [d.page_content for d in retriever.invoke(QUESTION, k=1)] == [CAPITAL]
    assert len(asyncio.run(retriever.ainvoke(QUESTION, k=2))) == 2


def test_chain_answers_over_the_documents_as_separate_cached_passages(pipeline, engine):
    chain = create_infoflow_rag_chain(InfoFlowRetriever(index=pipeline.index, k=2), chat(pipeline))
    first = chain.invoke({"question": QUESTION})
    again = chain.invoke({"question": QUESTION})

    texts = [doc.page_content for doc in first["documents"]]
    assert texts[0] == CAPITAL and len(texts) == 2
    assert first["stats"]["passages_computed"] == 2 and again["stats"]["passages_hit"] == 2
    # One passage per document, each with its own separator: not one joined string.
    assert first["stats"]["context_tokens"] == sum(len(engine.passage_ids(t)) for t in texts)
    assert 0 < again["stats"]["recompute_fraction"] <= 0.16 and again["stats"]["ttft"] > 0
    assert first["answer"] == again["answer"] != ""


def test_chain_with_full_recompute_matches_full_prefill(pipeline, engine):
    chain = create_infoflow_rag_chain(InfoFlowRetriever(index=pipeline.index, k=3), chat(pipeline, selector="full"))
    out = chain.invoke({"question": QUESTION})
    texts = [doc.page_content for doc in out["documents"]]
    assert out["answer"] == engine.full_prefill_answer(QUESTION, texts, max_new_tokens=MAX_TOKENS)[0]


def test_chain_over_a_lead_in_pipeline_reuses_its_caches_and_at_full_recompute_is_full_prefill(engine, tmp_path):
    index = PassageIndex.create(tmp_path / "index", embedder=BagOfWordsEmbedder())
    index.add_passages(PASSAGES, sources=[f"doc{i}.txt" for i in range(len(PASSAGES))])
    pipeline = Pipeline(engine.replace(lead_in=NEUTRAL_LEAD_IN), open_store("memory"), index)
    llm = chat(pipeline, selector="sinkflow", ratio=1.0)
    chain = create_infoflow_rag_chain(InfoFlowRetriever(index=index, k=3), llm)
    first, again = chain.invoke({"question": QUESTION}), chain.invoke({"question": QUESTION})
    texts = [doc.page_content for doc in again["documents"]]
    assert first["stats"]["passages_computed"] == 3 and again["stats"]["passages_hit"] == 3
    # Every token of the lead-in caches recomputed: the uncached answer, through the adapter.
    assert again["answer"] == engine.full_prefill_answer(QUESTION, texts, max_new_tokens=MAX_TOKENS)[0]


def test_chain_streams_documents_then_answer_deltas_then_stats(pipeline):
    chain = create_infoflow_rag_chain(InfoFlowRetriever(index=pipeline.index, k=2), chat(pipeline))
    chunks = list(chain.stream({"question": QUESTION}))
    assert list(chunks[0]) == ["documents"] and list(chunks[-1]) == ["stats"]
    assert len(chunks) > 3 and all(list(c) == ["answer"] for c in chunks[1:-1])
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    invoked = chain.invoke({"question": QUESTION})
    assert total["answer"].strip() == invoked["answer"]
    assert total["documents"] == invoked["documents"]
    assert total["stats"]["passages_computed"] == 2 and invoked["stats"]["passages_hit"] == 2


def test_chain_runs_async_and_astream_streams_the_answer(pipeline):
    chain = create_infoflow_rag_chain(InfoFlowRetriever(index=pipeline.index, k=2), chat(pipeline))
    out = asyncio.run(chain.ainvoke({"question": QUESTION}))
    assert out["documents"][0].page_content == CAPITAL and out["stats"]["passages_computed"] == 2

    async def astream() -> list[dict]:
        return [chunk async for chunk in chain.astream({"question": QUESTION})]

    chunks = asyncio.run(astream())
    assert list(chunks[0]) == ["documents"] and list(chunks[-1]) == ["stats"]
    assert len(chunks) > 3 and all(list(c) == ["answer"] for c in chunks[1:-1])
    assert "".join(c["answer"] for c in chunks[1:-1]).strip() == out["answer"]
    assert chunks[-1]["stats"]["passages_hit"] == 2


class FixedRetriever(BaseRetriever):
    documents: list[Document]

    def _get_relevant_documents(self, query: str, *, run_manager) -> list[Document]:
        return self.documents


def test_chain_skips_blank_documents_and_says_when_the_retriever_found_none(pipeline, engine):
    llm = chat(pipeline)
    answered = create_infoflow_rag_chain(FixedRetriever(documents=[Document(" "), Document(CAPITAL)]), llm)
    assert answered.invoke({"question": QUESTION})["stats"]["context_tokens"] == len(engine.passage_ids(CAPITAL))
    for documents in ([], [Document("\n")]):  # a score threshold can leave none
        with pytest.raises(ValueError, match="the retriever returned no document with text for 'What is the"):
            create_infoflow_rag_chain(FixedRetriever(documents=documents), llm).invoke({"question": QUESTION})


def test_chain_rejects_a_bad_question_and_a_foreign_llm(pipeline):
    retriever = InfoFlowRetriever(index=pipeline.index)
    with pytest.raises(ValueError, match=r'the chain takes \{"question": str\}'):
        create_infoflow_rag_chain(retriever, chat(pipeline)).invoke({"query": QUESTION})
    with pytest.raises(TypeError, match="llm must be a ChatInfoFlow"):
        create_infoflow_rag_chain(retriever, PROMPT)


def test_chat_model_reuses_indexed_passages_quoted_in_the_prompt(pipeline):
    llm = chat(pipeline)
    message = (PROMPT | llm).invoke({"context": "\n\n".join(PASSAGES), "question": QUESTION})
    meta = message.response_metadata
    assert meta["passages_computed"] == len(PASSAGES) and meta["reused_share"] == 0  # nothing was stored yet
    assert message.usage_metadata["input_token_details"]["cache_read"] == 0
    message = (PROMPT | llm).invoke({"context": "\n\n".join(PASSAGES), "question": QUESTION})
    meta = message.response_metadata
    assert meta["passages_hit"] == len(PASSAGES)
    assert 0 < meta["reused_share"] < 1 and 0 < meta["recompute_fraction"] <= 0.16
    assert meta["model_name"] == "tiny-llama"
    usage = message.usage_metadata
    assert usage["input_token_details"]["cache_read"] == meta["stored_tokens"] > 0
    assert usage["input_tokens"] == meta["prompt_tokens"] and usage["output_tokens"] == meta["generated_tokens"]


def test_a_plain_lcel_chain_over_any_retriever_reuses_on_the_second_query(engine):
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=8))  # not an infoflow index
    store.add_texts(PASSAGES)
    prompt = ChatPromptTemplate.from_messages([("human", "Notes: {context}\n\nQuestion: " + QUESTION)])
    llm = chat(Pipeline(engine, open_store("memory")))  # nothing indexed, registered or stored
    chain = store.as_retriever(search_kwargs={"k": 2}) | (lambda docs: " ".join(d.page_content for d in docs))
    chain = chain | prompt | llm
    first, second = chain.invoke(QUESTION), chain.invoke(QUESTION)
    third = asyncio.run(chain.ainvoke(QUESTION))  # async retrievers report their documents too
    metadata = [m.response_metadata for m in (first, second, third)]
    reuse = [(m["passages_hit"], m["passages_computed"]) for m in metadata]
    assert reuse == [(0, 2), (2, 0), (2, 0)]  # the documents are inline, the second not at a line start
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    assert third.usage_metadata["input_token_details"]["cache_read"] > 0


def test_chat_model_without_known_passages_reports_no_reuse(tiny_pipeline):
    message = chat(tiny_pipeline).invoke("Name a river in Europe.")
    assert message.response_metadata["reused_share"] == 0 and message.usage_metadata["output_tokens"] >= 1
    cut = message.usage_metadata["output_tokens"] == chat(tiny_pipeline).max_tokens  # the random model runs on
    assert message.response_metadata["finish_reason"] == ("length" if cut else "stop")


def test_chat_model_streams_with_stats_on_the_last_chunk(pipeline):
    llm = chat(pipeline)
    inputs = {"context": "\n\n".join(PASSAGES), "question": QUESTION}
    chunks = list((PROMPT | llm).stream(inputs))
    assert len(chunks) > 2 and chunks[-1].chunk_position == "last"
    assert all("reused_share" not in c.response_metadata for c in chunks[:-1])
    message = chunks[0]
    for chunk in chunks[1:]:
        message = message + chunk
    assert message.content.strip() == (PROMPT | llm).invoke(inputs).content
    stats = message.response_metadata  # the stream came first: every passage was prefilled, none reused
    assert stats["passages_computed"] == len(PASSAGES) and stats["reused_share"] == 0


def test_per_call_options_override_the_fields(tiny_pipeline):
    llm = chat(tiny_pipeline, selector="cacheblend")
    options = llm.engine_options(["\n"], max_tokens=3, ratio=0.5)
    assert options == {
        "options": QueryOptions(selector="cacheblend", ratio=0.5),
        "max_new_tokens": 3,
        "temperature": 0.0,
        "stop": ["\n"],
    }
    assert llm.invoke("Hello", max_tokens=2).usage_metadata["output_tokens"] <= 2
    assert llm.invoke("Hello", max_tokens=2, stream=True).content == llm.invoke("Hello", max_tokens=2).content
    with pytest.raises(ValueError, match="serves 'tiny-llama', not 'other'"):
        llm.invoke("Hello", model="other")


def test_tokens_are_counted_by_the_served_models_tokenizer(tiny_pipeline, engine, monkeypatch):
    # LangChain's default counts with GPT-2's tokenizer, fetched from a model hub: never here
    monkeypatch.setattr("transformers.GPT2TokenizerFast.from_pretrained", lambda *a, **k: pytest.fail("hub fetch"))
    llm = chat(tiny_pipeline)
    assert llm.get_num_tokens("Who wrote it?") == len(encode(engine.tokenizer, "Who wrote it?")) > 0


def test_messages_to_turns_keeps_text_and_refuses_tools_and_images():
    turns = messages_to_turns(
        [SystemMessage("Be brief."), HumanMessage([{"type": "text", "text": "Hi"}]), AIMessage("Hello")]
    )
    assert turns == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    with pytest.raises(ValueError, match="got a 'tool' message; tool calling is not supported yet"):
        messages_to_turns([HumanMessage("Hi"), ToolMessage("4", tool_call_id="1")])
    # chunks too: a streamed reply added up (AIMessageChunk) goes back into the history as it is
    chunks = [SystemMessageChunk("Be brief."), HumanMessageChunk("Hi"), AIMessageChunk("Hel") + AIMessageChunk("lo")]
    assert messages_to_turns(chunks) == turns
    with pytest.raises(ValueError, match=r"text only, got content blocks of type \['image'\]"):
        messages_to_turns([HumanMessage([{"type": "image", "url": "https://example.com/a.png"}])])


CONVERSATION = [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another?")]
MESSAGES = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}


def test_a_conversation_is_the_model_chat_template_of_all_turns(tiny_pipeline, engine, monkeypatch):
    prompts = record_prompts(monkeypatch)
    message = chat(tiny_pipeline).invoke([MESSAGES[role](text) for role, text in CONVERSATION])
    assert prompts == [chat_template(engine, CONVERSATION)]
    assert message.usage_metadata["input_tokens"] == len(encode(engine.tokenizer, prompts[0]))
    # what trim_messages(token_counter=llm) counts: the same tokens
    counted = chat(tiny_pipeline).get_num_tokens_from_messages([MESSAGES[role](t) for role, t in CONVERSATION])
    assert counted == message.usage_metadata["input_tokens"]
    streamed = list(chat(tiny_pipeline).stream([MESSAGES[role](text) for role, text in CONVERSATION]))
    assert prompts[1] == prompts[0] and "".join(c.content for c in streamed).strip() == message.content
    with pytest.raises(ValueError, match="the last message must be the user's, got 'assistant'"):
        chat(tiny_pipeline).invoke([HumanMessage("Hi"), AIMessage("Hello")])


def test_doubled_messages_render_with_the_leading_system_messages_joined(tiny_pipeline, engine, monkeypatch):
    """langchain-tests' test_double_messages_conversation: two of each role; the engine's head holds one system
    prompt, so the leading system messages become one, a paragraph each."""
    prompts = record_prompts(monkeypatch)
    doubled = [(role, text) for role, text in CONVERSATION[:3] for _ in range(2)] + [CONVERSATION[3]]
    chat(tiny_pipeline).invoke([MESSAGES[role](text) for role, text in doubled])
    joined = [("system", "Be brief.\n\nBe brief."), *doubled[2:]]
    assert prompts == [chat_template(engine, joined)]


def test_passages_in_an_earlier_user_turn_reuse_their_kv_and_usage_says_read_or_written(pipeline, engine):
    context = "Context:\n" + "\n\n".join(PASSAGES)
    messages = [HumanMessage(context), AIMessage("Canberra."), HumanMessage("Sure?")]
    first, again = chat(pipeline).invoke(messages), chat(pipeline).invoke(messages)
    passage_tokens = sum(len(encode(engine.tokenizer, text)) for text in PASSAGES)
    assert first.response_metadata["passages_computed"] == again.response_metadata["passages_hit"] == len(PASSAGES)
    # The first call read nothing from the store and wrote every passage; the second read them all.
    assert first.usage_metadata["input_token_details"] == {"cache_read": 0, "cache_creation": passage_tokens}
    assert again.usage_metadata["input_token_details"] == {"cache_read": passage_tokens, "cache_creation": 0}


class Events(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts = self.ends = 0

    def on_chat_model_start(self, *args, **kwargs) -> None:
        self.starts += 1

    def on_llm_end(self, *args, **kwargs) -> None:
        self.ends += 1


def test_async_calls_run_off_the_event_loop_with_one_event_each(pipeline):
    llm = ChatInfoFlow(pipeline=pipeline, max_tokens=TICKED_ANSWER_TOKENS)
    events = Events()
    config = {"callbacks": [events]}
    question = "Context:\n" + "\n\n".join(PASSAGES) + "\n\nTell me everything."

    async def astream() -> list:
        return [chunk async for chunk in llm.astream(question, config)]

    ticks, elapsed = asyncio.run(ticks_while(llm.ainvoke(question, config)))
    assert loop_ran_free(ticks, elapsed)
    ticks, elapsed = asyncio.run(ticks_while(astream()))
    assert loop_ran_free(ticks, elapsed)
    assert asyncio.run(overlap(llm.ainvoke(question), llm.ainvoke(question)))
    assert (events.starts, events.ends) == (2, 2)

    chunks = asyncio.run(astream())
    assert len(chunks) > 2 and chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] > 1
    assert "".join(c.content for c in chunks).strip() == llm.invoke(question).content


def test_bind_tools_says_what_is_supported(tiny_pipeline):
    with pytest.raises(NotImplementedError, match=r"does not support tool calling.*with_structured_output\(schema\)"):
        chat(tiny_pipeline).bind_tools([])


def test_bad_fields_are_rejected(tiny_pipeline):
    with pytest.raises(ValidationError, match="unknown selector 'bogus'"):
        ChatInfoFlow(pipeline=tiny_pipeline, selector="bogus")
    with pytest.raises(ValidationError, match="model='smollm2-135m' but the given pipeline serves 'tiny-llama'"):
        ChatInfoFlow(pipeline=tiny_pipeline, model="smollm2-135m")
    with pytest.raises(ValidationError, match=r"ratio must be in \(0, 1\], got 0.0"):  # QueryOptions' own check
        ChatInfoFlow(pipeline=tiny_pipeline, ratio=0)


FACTS = [
    "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "Mount Kilimanjaro, in Tanzania, is the highest mountain in Africa.",
    "The telephone was invented by Alexander Graham Bell, who was born in Edinburgh.",
]


@pytest.mark.real_model
def test_smollm_chain_reuses_kv_and_names_the_fact(tmp_path):
    index = PassageIndex.create(tmp_path / "index")  # the offline all-MiniLM-L6-v2
    index.add_passages(FACTS)
    pipeline = Pipeline(Engine.load("smollm2-135m"), open_store("memory"), index)
    chain = create_infoflow_rag_chain(
        InfoFlowRetriever(index=index, k=3), ChatInfoFlow(pipeline=pipeline, max_tokens=24)
    )
    question = "When was the Eiffel Tower completed?"
    first = chain.invoke({"question": question})
    again = chain.invoke({"question": question})
    assert first["documents"][0].page_content == FACTS[0]
    assert first["stats"]["passages_computed"] == 3 and again["stats"]["passages_hit"] == 3
    assert "1889" in again["answer"] and again["stats"]["recompute_fraction"] <= 0.16

    message = ChatInfoFlow(pipeline=pipeline, max_tokens=24).invoke(
        "Context:\n" + "\n\n".join(FACTS[::-1]) + f"\n\nAnswer in a few words. {question}"
    )
    assert message.response_metadata["passages_hit"] == 3 and message.response_metadata["reused_share"] > 0.3
    assert "1889" in message.content


def test_compression_fields_reach_the_engine(pipeline):
    inputs = {"context": "\n\n".join(PASSAGES), "question": QUESTION}
    plain = (PROMPT | chat(pipeline)).invoke(inputs).response_metadata
    squeezed = (PROMPT | chat(pipeline, compress="snapkv", keep=0.5)).invoke(inputs).response_metadata
    assert (squeezed["compress"], squeezed["keep"]) == ("snapkv", 0.5) and plain["context_tokens"] > 0
    assert squeezed["kv_tokens"] == plain["kv_tokens"] - (plain["context_tokens"] - int(0.5 * plain["context_tokens"]))
    with pytest.raises(ValidationError, match="unknown compression policy 'zip'"):
        chat(pipeline, compress="zip")


def test_concurrent_first_calls_build_one_pipeline(monkeypatch):
    chat = ChatInfoFlow()
    assert pipelines_built_by_concurrent_first_calls(monkeypatch, chat.get_pipeline) == (1, 1)
