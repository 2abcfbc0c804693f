"""ChatInfoFlow: a LangChain chat model that serves each prompt through an infoflow-rag Pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import Field, model_validator

from infoflow_rag import DEFAULT_MODEL, OptionFields
from infoflow_rag.pipeline import (
    Pipeline,
    PipelineAnswer,
    PipelineStream,
    Turn,
    built_on_first_use,
    encode,
    finish_in_thread,
    iterate_in_thread,
    render,
)

from .retrieved import RETRIEVED, watch_retrievers
from .structured import structured_output


class ChatInfoFlow(BaseChatModel, OptionFields):
    """Answers with passage KV reuse: passages quoted in any user turn reuse their KV.

    Passages are the pipeline's indexed or registered ones, and the documents any retriever in the process
    returned lately (``retrieved.py``): in a plain ``retriever | format_docs | prompt | ChatInfoFlow`` chain
    they are prefilled and stored on first sight and reused from then on.

    Messages (system, human, AI) are written by the model's own chat template. Pass a ready ``pipeline``
    (e.g. ``Pipeline.open(index_dir)``), or a ``model`` name to build one with an in-memory KV store on
    first use. Reuse statistics land in ``response_metadata``, token counts in ``usage_metadata``
    (``input_token_details``: ``cache_read`` from the store, ``cache_creation`` prefilled by this call).
    Async calls run the engine on a worker thread. The query options
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

    @model_validator(mode="after")
    def _watch_retrievers(self) -> ChatInfoFlow:
        watch_retrievers()
        return self

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
        return built_on_first_use(self, "pipeline", self.model)

    def engine_options(self, stop: list[str] | None = None, **overrides: Any) -> dict[str, Any]:
        """Pipeline arguments for one call: ``options`` (the fields' QueryOptions), generation settings, and
        per-call overrides of either (``max_tokens`` included)."""
        overrides.pop("stream", None)  # LangChain's own switch (invoke(stream=True)), forwarded to _stream
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
            "stop": stop or (),  # a string is one stop (the engine's GenerationConfig reads it so)
            **overrides,
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(self._start(messages, stop, kwargs).finish())

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(await finish_in_thread(lambda: self._start(messages, stop, kwargs)))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for step in self._start(messages, stop, kwargs).steps():
            chunk = self._chunk(step)
            if run_manager is not None and isinstance(step, str):
                run_manager.on_llm_new_token(step, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for step in iterate_in_thread(lambda: self._start(messages, stop, kwargs).steps()):
            chunk = self._chunk(step)
            if run_manager is not None and isinstance(step, str):
                await run_manager.on_llm_new_token(step, chunk=chunk)
            yield chunk

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids by the served model's own tokenizer: LangChain's default is GPT-2's, fetched from a model hub
        (``get_num_tokens``, ``trim_messages(token_counter=llm)`` count with this)."""
        return self.get_pipeline().engine.tokenizer.encode(text, add_special_tokens=False)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """The prompt's tokens through the model's chat template, as ``usage_metadata["input_tokens"]`` counts them
        (LangChain's default counts a "Human: ..." transcript, fewer: ``trim_messages(token_counter=llm)`` would
        keep too much). Tools are refused, as by :meth:`bind_tools`."""
        if tools:
            self.bind_tools(tools)
        engine = self.get_pipeline().engine
        return len(encode(engine.tokenizer, render(engine, messages_to_turns(messages))))

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable:
        raise NotImplementedError(
            "ChatInfoFlow does not support tool calling (bind_tools, tool messages). For a JSON reply that follows "
            "a schema, use with_structured_output(schema) with a pydantic class, a TypedDict or a JSON schema dict: "
            "decoding is constrained to the schema, so the reply parses"
        )

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: str = "json_schema",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable:
        """The reply as an instance of ``schema`` (a pydantic class) or a dict (a TypedDict or JSON schema), decoded
        under the schema's JSON grammar. Every ``method`` is that constrained decoding, and decoding is always
        strict. The JSON is finished within ``max_tokens``: when the budget runs short the last value is cut short,
        so give long values room."""
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        return structured_output(self, schema, include_raw, method, strict)

    def _start(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> PipelineStream:
        turns, known = messages_to_turns(messages), RETRIEVED.texts()
        return self.get_pipeline().stream_chat(turns, known=known, **self.engine_options(stop, **kwargs))

    def _result(self, answer: PipelineAnswer) -> ChatResult:
        message = AIMessage(
            content=answer.answer, response_metadata=self._metadata(answer), usage_metadata=_usage(answer)
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _chunk(self, step: str | PipelineAnswer) -> ChatGenerationChunk:
        if isinstance(step, str):
            return ChatGenerationChunk(message=AIMessageChunk(content=step))
        # The stats exist only once decoding ends: a last, empty chunk carries them.
        last = AIMessageChunk(
            content="", response_metadata=self._metadata(step), usage_metadata=_usage(step), chunk_position="last"
        )
        return ChatGenerationChunk(message=last)

    def _metadata(self, answer: PipelineAnswer) -> dict[str, Any]:
        return {**answer.stats(), "model_name": self.model, "model_provider": "infoflow"}


# message type -> chat template role; chunks too: a streamed reply added up is an AIMessageChunk in the history
ROLES = {
    "system": "system",
    "human": "user",
    "ai": "assistant",
    "SystemMessageChunk": "system",
    "HumanMessageChunk": "user",
    "AIMessageChunk": "assistant",
}


def messages_to_turns(messages: Sequence[BaseMessage]) -> list[Turn]:
    """System, human and AI messages as chat turns, for the model's own chat template (text content only)."""
    turns = []
    for message in messages:
        role = message.role if isinstance(message, ChatMessage) else ROLES.get(message.type)
        if role is None or (isinstance(message, AIMessage) and message.tool_calls):
            raise ValueError(
                f"ChatInfoFlow reads system, human and AI text messages, got a {message.type!r} message"
                + (" with tool calls" if role else "")
                + ("; tool calling is not supported yet" if role or message.type in ("tool", "function") else "")
            )
        blocks = message.content if isinstance(message.content, list) else []
        kinds = {b.get("type") for b in blocks if isinstance(b, dict)} - {"text"}
        if kinds:
            raise ValueError(f"ChatInfoFlow reads text only, got content blocks of type {sorted(kinds)}")
        turns.append(Turn(role=role, content=message.text))
    return turns


def _usage(answer: PipelineAnswer) -> UsageMetadata:
    result = answer.result
    usage = UsageMetadata(
        input_tokens=result.prompt_tokens,
        output_tokens=result.generated_tokens,
        total_tokens=result.prompt_tokens + result.generated_tokens,
    )
    # Read from the cache: the passage tokens the store already held; written: those this call prefilled.
    usage["input_token_details"] = {
        "cache_read": answer.reuse.stored_tokens,
        "cache_creation": answer.reuse.prefilled_tokens,
    }
    return usage
