"""ChatInfoFlow: a LangChain chat model that serves each prompt through an infoflow-rag Pipeline."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field, model_validator

from infoflow_rag import DEFAULT_MODEL, OptionFields
from infoflow_rag.pipeline import Pipeline, PipelineAnswer


class ChatInfoFlow(BaseChatModel, OptionFields):
    """Answers with passage KV reuse: registered or indexed passages quoted in the prompt reuse their KV.

    Pass a ready ``pipeline`` (e.g. ``Pipeline.open(index_dir)``), or a ``model`` name to build one with an
    in-memory KV store on first use. Reuse statistics land in ``response_metadata``. The query options
    (selector, ratio, reorder, compress, keep, ...) are the fields of ``infoflow_rag.QueryOptions``.
    """

    model: str = Field(default=DEFAULT_MODEL, description="Registered model name or path of the engine.")
    pipeline: Pipeline | None = Field(default=None, exclude=True, description="The pipeline to answer with.")
    max_tokens: int = Field(default=64, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature; 0 is greedy.")
    stop: list[str] | None = Field(default=None, description="Generation ends before any of these strings.")

    @model_validator(mode="before")
    @classmethod
    def _model_from_pipeline(cls, values: Any) -> Any:
        pipeline = values.get("pipeline") if isinstance(values, dict) else None
        if pipeline is not None:
            name = pipeline.model_name
            if values.setdefault("model", name) != name:
                raise ValueError(
                    f"model={values['model']!r} but the given pipeline serves {name!r}; pass one of the two"
                )
        return values

    @property
    def _llm_type(self) -> str:
        return "infoflow"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            **self.query_options().to_dict(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def get_pipeline(self) -> Pipeline:
        """The pipeline answering prompts (built from ``model`` with an in-memory store on first use)."""
        if self.pipeline is None:
            self.pipeline = Pipeline.from_model(self.model)
        return self.pipeline

    def engine_options(self, stop: list[str] | None = None, **overrides: Any) -> dict[str, Any]:
        """Pipeline arguments for one call: ``options`` (the fields' QueryOptions), generation settings, and
        per-call overrides of either (``max_tokens`` included)."""
        model = overrides.pop("model", self.model)
        if model != self.model:
            raise ValueError(
                f"this ChatInfoFlow serves {self.model!r}, not {model!r}; create one ChatInfoFlow per model"
            )
        stop = stop if stop is not None else self.stop
        options, overrides = self.query_options().split(overrides)
        return {
            "options": options,
            "max_new_tokens": overrides.pop("max_tokens", self.max_tokens),
            "temperature": self.temperature,
            "stop": tuple(stop or ()),
            **overrides,
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        options = self.engine_options(stop, **kwargs)
        answer = self.get_pipeline().answer_prompt(messages_to_prompt(messages), **options)
        message = AIMessage(content=answer.answer, response_metadata=self._metadata(), usage_metadata=_usage(answer))
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=answer.stats())])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        options = self.engine_options(stop, **kwargs)
        stream = self.get_pipeline().stream_prompt(messages_to_prompt(messages), **options)
        for delta in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        # The stats exist only once decoding ends: a last, empty chunk carries them.
        last = AIMessageChunk(
            content="",
            response_metadata=self._metadata(),
            usage_metadata=_usage(stream.answer),
            chunk_position="last",
        )
        yield ChatGenerationChunk(message=last, generation_info=stream.answer.stats())

    def _metadata(self) -> dict[str, Any]:
        return {"model_name": self.model, "model_provider": "infoflow"}


def messages_to_prompt(messages: Sequence[BaseMessage]) -> str:
    """System and human texts in order, one paragraph each; the engine adds the model's chat template."""
    parts = []
    for message in messages:
        if not isinstance(message, SystemMessage | HumanMessage):
            raise ValueError(
                f"ChatInfoFlow answers a single user turn, got a {message.type!r} message; pass system and "
                "human messages only, with any earlier turns written into the human text"
            )
        blocks = message.content if isinstance(message.content, list) else []
        kinds = {b.get("type") for b in blocks if isinstance(b, dict)} - {"text"}
        if kinds:
            raise ValueError(f"ChatInfoFlow reads text only, got content blocks of type {sorted(kinds)}")
        parts.append(message.text)
    return "\n\n".join(parts)


def _usage(answer: PipelineAnswer) -> UsageMetadata:
    result = answer.result
    usage = UsageMetadata(
        input_tokens=result.prompt_tokens,
        output_tokens=result.generated_tokens,
        total_tokens=result.prompt_tokens + result.generated_tokens,
    )
    if answer.reuse is not None:  # read from the cache: what the store already held, not what this call prefilled
        usage["input_token_details"] = {"cache_read": answer.reuse.stored_tokens}
    return usage
