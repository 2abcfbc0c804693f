"""Passage boundaries where LangChain still has them: the documents every retriever returns.

A chat model only receives messages: in ``retriever | format_docs | prompt | ChatInfoFlow`` the documents
are joined into one string before it runs. LangChain reports each retriever's documents to the callback
handlers of its run, and a configure hook (``register_configure_hook``, the mechanism LangSmith tracing
uses) adds a handler to every run in the process. ChatInfoFlow finds the recorded documents in its prompts
by their text; they are prefilled and stored on first sight and reused from then on — for any retriever,
with no wrapper and nothing passed through the chain.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.tracers.context import register_configure_hook

from infoflow_rag.pipeline import RecentPassages

# Process-wide, as the hook is: documents retrieved in any chain (bounded, deduplicated, thread-safe).
RETRIEVED = RecentPassages()

_installed = False
_install_lock = threading.Lock()


class RetrievedDocuments(BaseCallbackHandler):
    """Records the ``page_content`` of the documents each retriever returns in :data:`RETRIEVED`."""

    run_inline = True  # a cheap, thread-safe record: async runs need not hop to an executor for it

    def on_retriever_end(self, documents: list[Document], **kwargs: Any) -> None:
        RETRIEVED.add(doc.page_content for doc in documents)


def watch_retrievers() -> None:
    """Register the hook once per process. Its context variable's default is the handler, so every thread and
    task sees it (a value set with ``.set()`` would only reach the setting context)."""
    global _installed
    with _install_lock:
        if not _installed:
            handler = RetrievedDocuments()  # one, shared on purpose: see the docstring
            var: ContextVar[BaseCallbackHandler | None] = ContextVar("infoflow_retrieved_documents", default=handler)  # noqa: B039
            register_configure_hook(var, inheritable=False)
            _installed = True
