"""InfoFlowLLM: a LlamaIndex LLM that serves each prompt through an infoflow-rag Pipeline."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.llms.types import CompletionResponse, CompletionResponseGen, LLMMetadata
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from infoflow_rag.engine import Engine
from infoflow_rag.engine.compression import POLICIES, validate_policy
from infoflow_rag.engine.selection import DEFAULT_RATIO, SELECTORS, validate_selector
from infoflow_rag.models import DEFAULT_MODEL
from infoflow_rag.pipeline import Pipeline, PipelineAnswer
from infoflow_rag.store import open_store

STATS_KEY = "infoflow"  # CompletionResponse.additional_kwargs[STATS_KEY] holds PipelineAnswer.stats()


class InfoFlowLLM(CustomLLM):
    """Completes prompts with passage KV reuse: registered passages found in the prompt reuse their KV.

    Pass a ``pipeline`` shared with :class:`InfoFlowKVCacheTransform`, or a ``model`` name to build one
    with an in-memory KV store on first use.
    """

    model: str = Field(default=DEFAULT_MODEL, description="Registered model name or path of the engine.")
    selector: str = Field(default="infoflow", description="Tokens to recompute: " + ", ".join(SELECTORS))
    ratio: float = Field(default=DEFAULT_RATIO, gt=0, le=1, description="Share of context tokens recomputed.")
    reorder: bool = Field(default=False, description="Order cached passages by density (densest last).")
    compress: str = Field(default="none", description="KV compression before decoding: " + ", ".join(POLICIES))
    keep: float = Field(default=1.0, gt=0, le=1, description="Share of passage tokens kept by compression.")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature; 0 is greedy.")

    _pipeline: Pipeline | None = PrivateAttr(default=None)

    def __init__(self, pipeline: Pipeline | None = None, **kwargs: Any) -> None:
        if pipeline is not None:
            name = pipeline.engine.loaded.name
            if kwargs.setdefault("model", name) != name:
                raise ValueError(
                    f"model={kwargs['model']!r} but the given pipeline serves {name!r}; pass one of the two"
                )
        super().__init__(**kwargs)
        self._pipeline = pipeline

    @field_validator("selector")
    @classmethod
    def _known_selector(cls, value: str) -> str:
        return validate_selector(value)

    @field_validator("compress")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        return validate_policy(value)

    @classmethod
    def class_name(cls) -> str:
        return "InfoFlowLLM"

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline answering prompts (built from ``model`` with an in-memory store on first use)."""
        if self._pipeline is None:
            self._pipeline = Pipeline(Engine(self.model), open_store("memory"))
        return self._pipeline

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.pipeline.engine.max_positions,
            num_output=self.max_new_tokens,
            is_chat_model=False,
            model_name=self.model,
        )

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = self.pipeline.answer_prompt(self._prompt(prompt, formatted), **self._options(kwargs))
        return _response(answer.answer, answer)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream = self.pipeline.stream_prompt(self._prompt(prompt, formatted), **self._options(kwargs))

        def deltas() -> CompletionResponseGen:
            text = ""
            for delta in stream:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            # The stats exist only once decoding ends: a last, empty delta carries them.
            yield _response(text, stream.answer, delta="")

        return deltas()

    def _prompt(self, prompt: str, formatted: bool) -> str:
        # The engine wraps the prompt in the model's chat template itself; this is the user's own hook.
        return prompt if formatted else self.completion_to_prompt(prompt)

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return {
            "selector": self.selector,
            "ratio": self.ratio,
            "reorder": self.reorder,
            "compress": self.compress,
            "keep": self.keep,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            **overrides,
        }


def _response(text: str, answer: PipelineAnswer, delta: str | None = None) -> CompletionResponse:
    return CompletionResponse(
        text=text, delta=delta, additional_kwargs={STATS_KEY: answer.stats()}, raw=answer.to_dict()
    )
