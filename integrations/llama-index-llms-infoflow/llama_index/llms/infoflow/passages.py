"""Passage boundaries where LlamaIndex still has them: a span handler on the root dispatcher.

An LLM only receives the joined prompt string. Before it, LlamaIndex opens a span for each synthesis (its
arguments hold the retrieved nodes, after postprocessors) and for each prediction (its arguments hold the
context string exactly as it is written into the template). This handler hands both to the InfoFlowLLM
that will answer, through its ``recent_passages``; the prompt's passages are then found by their text,
prefilled and stored on first sight and reused from then on — for any retriever and vector store, with
no ingestion step.
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.span import BaseSpan
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.schema import MetadataMode

from infoflow_rag.pipeline import RecentPassages

# The template variables LlamaIndex's synthesizers put retrieved text in: text_qa, summary and tree
# templates take context_str, the refine template context_msg.
CONTEXT_ARGS = ("context_str", "context_msg")

logger = logging.getLogger(__name__)

_installed = False
_install_lock = threading.Lock()


def watch_passages() -> None:
    """Install the handler on LlamaIndex's root dispatcher, once per process (every dispatcher reports to it)."""
    global _installed
    with _install_lock:
        if not _installed:
            get_dispatcher().add_span_handler(PassageSpans())
            _installed = True


def _recent(component: Any) -> RecentPassages | None:
    recent = getattr(component, "recent_passages", None)
    return recent if isinstance(recent, RecentPassages) else None


class PassageSpans(BaseSpanHandler[BaseSpan]):
    """Feeds each InfoFlowLLM the nodes synthesized for it and the context strings of its predictions.

    It opens no spans of its own (``new_span`` returns None), so it keeps no state between calls.
    """

    @classmethod
    def class_name(cls) -> str:
        return "InfoFlowPassageSpans"

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # LlamaIndex's dispatcher drops whatever a span handler raises, without a word: say it here, or a
        # query would silently run without its cached passages.
        try:
            self._record(bound_args.arguments, instance)
        except Exception:
            logger.warning(
                "InfoFlowLLM could not read the passages of a LlamaIndex %s span; in this query, what the prompt "
                "quotes and the KV store does not hold yet is computed fresh",
                type(instance).__name__,
                exc_info=True,
            )

    @staticmethod
    def _record(args: dict[str, Any], instance: Any) -> None:
        # A synthesizer (synthesize / asynthesize) quotes each node as node.get_content(MetadataMode.LLM).
        if "nodes" in args and (recent := _recent(getattr(instance, "_llm", None))) is not None:
            recent.add(n.node.get_content(metadata_mode=MetadataMode.LLM) for n in args["nodes"])
        # A prediction (predict, stream, apredict, astream, structured_predict, ...): str.format writes each
        # argument as str(value), so a list of chunks (simple_summarize) lands in the prompt as its repr.
        elif (recent := _recent(instance)) is not None:
            prompt_args = args.get("prompt_args") or {}
            for name in CONTEXT_ARGS:
                if name in prompt_args:
                    recent.add_context(str(prompt_args[name]))

    def prepare_to_exit_span(self, id_: str, bound_args: inspect.BoundArguments, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, id_: str, bound_args: inspect.BoundArguments, **kwargs: Any) -> None:
        return None
