"""Model-free retrieval: source splitting, SQLite passage records, embeddings and FAISS search."""

from infoflow_rag.errors import ReadOnlyIndexError  # raised by PassageIndex, declared with the other errors
from infoflow_rag.index.embedder import DEFAULT_MODEL, Embedder, TextEmbedder
from infoflow_rag.index.faiss_index import IVF_TRAIN_FACTOR, IndexSpec, SearchResult, VectorIndex
from infoflow_rag.index.passage_index import Hit, PassageIndex
from infoflow_rag.index.records import AddResult, PassageRecord, PassageRecords, content_hash
from infoflow_rag.index.splitting import (
    Document,
    TokenWindow,
    load_source,
    split_paragraphs,
    split_token_windows,
)

__all__ = [
    "DEFAULT_MODEL",
    "IVF_TRAIN_FACTOR",
    "AddResult",
    "Document",
    "Embedder",
    "Hit",
    "IndexSpec",
    "PassageIndex",
    "PassageRecord",
    "PassageRecords",
    "ReadOnlyIndexError",
    "SearchResult",
    "TextEmbedder",
    "TokenWindow",
    "VectorIndex",
    "content_hash",
    "load_source",
    "split_paragraphs",
    "split_token_windows",
]
