"""InfoFlowLLM: a LlamaIndex LLM that serves each prompt through an infoflow-rag Pipeline."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.types import Model
from llama_index.llms.infoflow.passages import watch_passages

from infoflow_rag import DEFAULT_MODEL, OptionFields
from infoflow_rag.pipeline import (
    Pipeline,
    PipelineAnswer,
    PipelineStream,
    RecentPassages,
    Turn,
    built_on_first_use,
    finish_in_thread,
    iterate_in_thread,
)

if TYPE_CHECKING:
    from llama_index.core.program.utils import FlexibleModel

STATS_KEY = "infoflow"  # response.raw[STATS_KEY] holds PipelineAnswer.stats(); raw["usage"] the token counts

Response = CompletionResponse | ChatResponse


class InfoFlowLLM(CustomLLM, OptionFields):
    """Completes prompts with passage KV reuse: registered passages found in the prompt reuse their KV.

    ``chat`` writes the messages (system, user, assistant) with the model's own chat template; passages
    are recognised in any user turn. Statistics go in ``response.raw`` (never in ``additional_kwargs``,
    which chat engines write back into the next prompt): ``raw[STATS_KEY]`` the reuse statistics,
    ``raw["usage"]`` the token counts (``cache_read`` from the store, ``cache_creation`` prefilled now) that
    ``TokenCountingHandler`` reads. Async methods run the engine on a worker thread.

    Passages need no ingestion step: the nodes a query engine synthesizes reach ``recent_passages`` (see
    ``passages.py``), and those quoted in the prompt are prefilled and stored on first sight, reused after.
    Pass a ``pipeline`` (shared with :class:`InfoFlowKVCacheTransform` to warm its store ahead of time), or
    a ``model`` name to build one with an in-memory KV store on first use. The query options (selector,
    ratio, reorder, compress, keep, ...) are the fields of ``infoflow_rag.QueryOptions``.
    """

    model: str = Field(default=DEFAULT_MODEL, description="Registered model name or path of the engine.")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature; 0 is greedy.")

    _pipeline: Pipeline | None = PrivateAttr(default=None)
    _recent: RecentPassages = PrivateAttr(default_factory=RecentPassages)

    def __init__(self, pipeline: Pipeline | None = None, **kwargs: Any) -> None:
        if pipeline is not None:
            name = pipeline.model_name
            if kwargs.setdefault("model", name) != name:
                raise ValueError(
                    f"model={kwargs['model']!r} but the given pipeline serves {name!r}; pass one of the two"
                )
        super().__init__(**kwargs)
        self._pipeline = pipeline
        watch_passages()

    @classmethod
    def class_name(cls) -> str:
        return "InfoFlowLLM"

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline answering prompts (built from ``model`` with an in-memory store on first use)."""
        return built_on_first_use(self, "_pipeline", self.model)

    @property
    def recent_passages(self) -> RecentPassages:
        """The passage texts recently synthesized for this LLM (bounded): prompts quoting them reuse their KV."""
        return self._recent

    @property
    def metadata(self) -> LLMMetadata:
        # Not a chat model for LlamaIndex: synthesizers then send their prompt as one user turn, whose head is
        # the one the ingested passages were prefilled behind (a system message would start another head).
        return LLMMetadata(
            context_window=self.pipeline.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=False,
            model_name=self.model,
        )

    # One decorated method per entry point, none calling another: each call emits one completion event.

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _response(self._completion(prompt, formatted, kwargs)().finish(), chat=False)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return _Responses(chat=False).of(self._completion(prompt, formatted, kwargs)().steps())

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _response(await finish_in_thread(self._completion(prompt, formatted, kwargs)), chat=False)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        start = self._completion(prompt, formatted, kwargs)
        return _Responses(chat=False).aof(iterate_in_thread(lambda: start().steps()))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _response(self._chat(messages, kwargs)().finish(), chat=True)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return _Responses(chat=True).of(self._chat(messages, kwargs)().steps())

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _response(await finish_in_thread(self._chat(messages, kwargs)), chat=True)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        start = self._chat(messages, kwargs)
        return _Responses(chat=True).aof(iterate_in_thread(lambda: start().steps()))

    # Structured prediction (and as_structured_llm, which calls it): LlamaIndex's text-completion program, whose
    # prompt describes the schema, with decoding constrained to the output class's JSON schema, so the reply parses.

    def structured_predict(
        self, output_cls: type[Model], prompt: PromptTemplate, llm_kwargs: dict[str, Any] | None = None, **args: Any
    ) -> Model:
        return super().structured_predict(output_cls, prompt, _constrained(output_cls, llm_kwargs), **args)

    async def astructured_predict(
        self, output_cls: type[Model], prompt: PromptTemplate, llm_kwargs: dict[str, Any] | None = None, **args: Any
    ) -> Model:
        return await super().astructured_predict(output_cls, prompt, _constrained(output_cls, llm_kwargs), **args)

    def stream_structured_predict(
        self, output_cls: type[Model], prompt: PromptTemplate, llm_kwargs: dict[str, Any] | None = None, **args: Any
    ) -> Generator[Model | FlexibleModel, None, None]:
        return super().stream_structured_predict(output_cls, prompt, _constrained(output_cls, llm_kwargs), **args)

    async def astream_structured_predict(
        self, output_cls: type[Model], prompt: PromptTemplate, llm_kwargs: dict[str, Any] | None = None, **args: Any
    ) -> AsyncGenerator[Model | FlexibleModel, None]:
        return await super().astream_structured_predict(
            output_cls, prompt, _constrained(output_cls, llm_kwargs), **args
        )

    def _completion(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> Callable[[], PipelineStream]:
        # The engine wraps the prompt in the model's chat template itself; completion_to_prompt is the user's hook.
        text = prompt if formatted else self.completion_to_prompt(prompt)
        options = self._options(kwargs)  # checked now, in the caller's thread
        known = self._recent.texts()
        return lambda: self.pipeline.stream_prompt(text, known=known, **options)

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> Callable[[], PipelineStream]:
        turns, options, known = messages_to_turns(messages), self._options(kwargs), self._recent.texts()
        return lambda: self.pipeline.stream_chat(turns, known=known, **options)

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        options, overrides = self.query_options().split(overrides)
        return {
            "options": options,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            **overrides,
        }


def _constrained(output_cls: type[BaseModel], llm_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The program's LLM arguments with the output class's JSON schema as the ``json_schema`` option."""
    return {"json_schema": output_cls.model_json_schema(), **(llm_kwargs or {})}


def messages_to_turns(messages: Sequence[ChatMessage]) -> list[Turn]:
    """System, user and assistant messages as chat turns (text blocks only) for the model's chat template."""
    turns = []
    for message in messages:
        kinds = sorted({type(b).__name__ for b in message.blocks if not isinstance(b, TextBlock)})
        if kinds:
            raise ValueError(f"InfoFlowLLM reads text only, got content blocks of type {kinds}")
        turns.append(Turn(role=MessageRole(message.role).value, content=message.content or ""))
    return turns


def _raw(answer: PipelineAnswer) -> dict[str, Any]:
    result, reuse = answer.result, answer.reuse
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.generated_tokens,
        "total_tokens": result.prompt_tokens + result.generated_tokens,
        "cache_read": reuse.stored_tokens,  # passage tokens the store already held
        "cache_creation": reuse.prefilled_tokens,  # passage tokens this call prefilled (and stored)
    }
    return {**answer.to_dict(), STATS_KEY: answer.stats(), "usage": usage}


def _response(answer: PipelineAnswer, chat: bool, text: str | None = None, delta: str | None = None) -> Response:
    text = answer.answer if text is None else text
    if chat:
        message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
        return ChatResponse(message=message, delta=delta, raw=_raw(answer))
    return CompletionResponse(text=text, delta=delta, raw=_raw(answer))


class _Responses:
    """Streamed responses: the text so far and its delta per step, the stats on a last, empty delta."""

    def __init__(self, chat: bool):
        self.chat, self.text = chat, ""

    def __call__(self, step: str | PipelineAnswer) -> Response:
        if not isinstance(step, str):  # the stats exist only once decoding ends
            return _response(step, self.chat, self.text, delta="")
        self.text += step
        if self.chat:
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=self.text), delta=step)
        return CompletionResponse(text=self.text, delta=step)

    def of(self, steps: Iterator[str | PipelineAnswer]) -> Iterator[Response]:
        return (self(step) for step in steps)

    async def aof(self, steps: Any) -> Any:
        async for step in steps:
            yield self(step)
