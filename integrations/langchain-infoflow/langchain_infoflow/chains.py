"""create_infoflow_rag_chain: retrieve, then answer over the documents as separate cached passages."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.documents import Document
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.utils import AddableDict

from infoflow_rag.pipeline import PipelineAnswer, PipelineStream, finish_in_thread, iterate_in_thread

from .chat_models import ChatInfoFlow


def create_infoflow_rag_chain(retriever: Runnable[str, list[Document]], llm: ChatInfoFlow) -> Runnable[dict, dict]:
    """``{"question": str}`` -> ``{"answer": str, "documents": [Document], "stats": dict}``.

    Each document's ``page_content`` is one passage: its KV comes from the pipeline's store (prefilled
    and stored on first sight), and ``llm``'s selector recomputes a share of its tokens.

    ``.stream()`` yields :class:`AddableDict` chunks: ``{"documents": [...]}`` first, then
    ``{"answer": delta}`` per text delta (raw, before the final strip ``invoke`` applies), then
    ``{"stats": {...}}``; adding the chunks up gives the whole output. ``astream`` yields the same chunks,
    the engine running on a worker thread.
    """
    if not isinstance(llm, ChatInfoFlow):
        raise TypeError(f"llm must be a ChatInfoFlow (it owns the KV pipeline), got {type(llm).__name__}")

    def retrieve(inputs: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        question = _question(inputs)
        return {"question": question, "documents": retriever.invoke(question, config)}

    async def aretrieve(inputs: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        question = _question(inputs)
        return {"question": question, "documents": await retriever.ainvoke(question, config)}

    steps = RunnableLambda(retrieve, afunc=aretrieve, name="retrieve") | InfoFlowAnswer(llm)
    return steps.with_config(run_name="infoflow_rag_chain")


def _question(inputs: dict[str, Any]) -> str:
    if not isinstance(inputs, dict) or not isinstance(inputs.get("question"), str):
        raise ValueError(f'the chain takes {{"question": str}}, got {inputs!r}')
    return inputs["question"]


class InfoFlowAnswer(Runnable[dict, dict]):
    """``{"question", "documents"}`` -> ``{"answer", "documents", "stats"}``, by ``stream_passages``."""

    def __init__(self, llm: ChatInfoFlow) -> None:
        self.llm = llm

    # Engine options come from the ChatInfoFlow; Runnable's **kwargs are accepted but not forwarded.
    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        return self._call_with_config(self._answer, input, config)

    def stream(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[dict]:
        yield from self._transform_stream_with_config(iter([input]), self._chunks, config)

    async def ainvoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        return await self._acall_with_config(self._aanswer, input, config)

    async def astream(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[dict]:
        async for chunk in self._atransform_stream_with_config(_one(input), self._achunks, config):
            yield chunk

    async def _aanswer(self, inputs: dict) -> dict:
        return self._output(inputs, await finish_in_thread(lambda: self._start(inputs)))

    async def _achunks(self, inputs: AsyncIterator[dict]) -> AsyncIterator[AddableDict]:
        async for item in inputs:
            async for chunk in iterate_in_thread(lambda item=item: self._chunks(iter([item]))):
                yield chunk

    def _answer(self, inputs: dict) -> dict:
        return self._output(inputs, self._start(inputs).finish())

    @staticmethod
    def _output(inputs: dict, answer: PipelineAnswer) -> dict:
        return {"answer": answer.answer, "documents": inputs["documents"], "stats": answer.stats()}

    def _chunks(self, inputs: Iterator[dict]) -> Iterator[AddableDict]:
        for item in inputs:
            yield AddableDict(documents=item["documents"])
            stream = self._start(item)
            for delta in stream:
                yield AddableDict(answer=delta)
            yield AddableDict(stats=stream.answer.stats())

    def _start(self, inputs: dict) -> PipelineStream:
        passages = [doc.page_content for doc in inputs["documents"] if doc.page_content.strip()]  # blank: no passage
        if not passages:  # the engine's own "no passages" speaks of a caller's list, not of a retriever
            raise ValueError(
                f"the retriever returned no document with text for {inputs['question']!r}; ingest passages into its "
                "index, or lower its score threshold"
            )
        return self.llm.get_pipeline().stream_passages(inputs["question"], passages, **self.llm.engine_options())


async def _one(item: dict) -> AsyncIterator[dict]:
    yield item
