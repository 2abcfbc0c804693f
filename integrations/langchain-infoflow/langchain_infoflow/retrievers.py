"""InfoFlowRetriever: LangChain documents from an infoflow-rag passage index."""

from __future__ import annotations

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import Field

from infoflow_rag.index.passage_index import PassageIndex
from infoflow_rag.pipeline import run_in_thread


class InfoFlowRetriever(BaseRetriever):
    """The ``k`` passages most similar to the query; a pipeline's index is ``pipeline.index``."""

    index: PassageIndex = Field(description="The infoflow-rag passage index to search.")
    k: int = Field(default=4, ge=1, description="Number of passages to return.")

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        """``k``: this call's number of passages (``retriever.invoke(query, k=2)``, as LangChain's own retrievers
        take it), else the field's."""
        return [
            Document(
                page_content=hit.text,
                id=str(hit.id),
                metadata={**hit.metadata, "id": hit.id, "score": hit.score, "source": hit.source},
            )
            for hit in self.index.search(query, self.k if k is None else k)
        ]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        sync = run_manager.get_sync()  # the search runs on a worker thread: the event loop keeps running
        return await run_in_thread(lambda: self._get_relevant_documents(query, run_manager=sync, k=k))
