"""The ingestion hook: nodes passing through it get their KV stored and become recognisable in prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode, MetadataMode, TransformComponent

from infoflow_rag.pipeline import Pipeline


class InfoFlowKVCacheTransform(TransformComponent):
    """Register each node's prompt text with ``pipeline`` (prefilling its KV); nodes pass through unchanged.

    Put it last in the transformations: the registered text must be exactly what a response
    synthesizer quotes, ``node.get_content(metadata_mode=MetadataMode.LLM)``.
    """

    _pipeline: Pipeline = PrivateAttr()

    def __init__(self, pipeline: Pipeline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pipeline = pipeline

    @classmethod
    def class_name(cls) -> str:
        return "InfoFlowKVCacheTransform"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        # Synthesizers strip each node's text before joining them (PromptHelper.repack), so register it
        # stripped; empty texts never reach a prompt and the engine rejects them.
        texts = [t for node in nodes if (t := node.get_content(metadata_mode=MetadataMode.LLM).strip())]
        if texts:
            self._pipeline.register(texts, progress=kwargs.get("show_progress", False))
        return nodes
