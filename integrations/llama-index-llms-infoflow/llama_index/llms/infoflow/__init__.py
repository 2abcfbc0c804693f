"""LlamaIndex integration of infoflow-rag: an LLM with passage KV reuse, its ingestion hook, an embedding."""

from llama_index.llms.infoflow.base import STATS_KEY, InfoFlowLLM
from llama_index.llms.infoflow.embedding import InfoFlowEmbedding
from llama_index.llms.infoflow.transform import InfoFlowKVCacheTransform

__all__ = ["STATS_KEY", "InfoFlowEmbedding", "InfoFlowKVCacheTransform", "InfoFlowLLM"]
