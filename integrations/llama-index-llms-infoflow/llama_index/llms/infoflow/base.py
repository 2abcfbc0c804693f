"""InfoFlowLLM: a LlamaIndex LLM that serves each prompt through an infoflow-rag Pipeline."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.llms.types import CompletionResponse, CompletionResponseGen, LLMMetadata
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from infoflow_rag import DEFAULT_MODEL, OptionFields
from infoflow_rag.pipeline import Pipeline, PipelineAnswer

STATS_KEY = "infoflow"  # CompletionResponse.additional_kwargs[STATS_KEY] holds PipelineAnswer.stats()


class InfoFlowLLM(CustomLLM, OptionFields):
    """Completes prompts with passage KV reuse: registered passages found in the prompt reuse their KV.

    Pass a ``pipeline`` shared with :class:`InfoFlowKVCacheTransform`, or a ``model`` name to build one
    with an in-memory KV store on first use. The query options (selector, ratio, reorder, compress, keep,
    ...) are the fields of ``infoflow_rag.QueryOptions``.
    """

    model: str = Field(default=DEFAULT_MODEL, description="Registered model name or path of the engine.")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature; 0 is greedy.")

    _pipeline: Pipeline | None = PrivateAttr(default=None)

    def __init__(self, pipeline: Pipeline | None = None, **kwargs: Any) -> None:
        if pipeline is not None:
            name = pipeline.model_name
            if kwargs.setdefault("model", name) != name:
                raise ValueError(
                    f"model={kwargs['model']!r} but the given pipeline serves {name!r}; pass one of the two"
                )
        super().__init__(**kwargs)
        self._pipeline = pipeline

    @classmethod
    def class_name(cls) -> str:
        return "InfoFlowLLM"

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline answering prompts (built from ``model`` with an in-memory store on first use)."""
        if self._pipeline is None:
            self._pipeline = Pipeline.from_model(self.model)
        return self._pipeline

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.pipeline.context_window,
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
        options, overrides = self.query_options().split(overrides)
        return {
            "options": options,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            **overrides,
        }


def _response(text: str, answer: PipelineAnswer, delta: str | None = None) -> CompletionResponse:
    return CompletionResponse(
        text=text, delta=delta, additional_kwargs={STATS_KEY: answer.stats()}, raw=answer.to_dict()
    )
