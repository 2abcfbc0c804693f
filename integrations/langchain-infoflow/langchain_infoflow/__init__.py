"""LangChain integration of infoflow-rag: a chat model with passage KV reuse, a retriever and a RAG chain."""

from langchain_infoflow.chains import InfoFlowAnswer, create_infoflow_rag_chain
from langchain_infoflow.chat_models import ChatInfoFlow, messages_to_turns
from langchain_infoflow.retrievers import InfoFlowRetriever

__all__ = [
    "ChatInfoFlow",
    "InfoFlowAnswer",
    "InfoFlowRetriever",
    "create_infoflow_rag_chain",
    "messages_to_turns",
]
