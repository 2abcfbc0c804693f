"""Request bodies of the OpenAI-compatible endpoints, with infoflow-rag's extension fields.

Unknown fields are ignored (clients send fields this server has no use for); fields that would change
the answer in a way the server cannot honour (``n`` > 1, tools, log probabilities, penalties, ...) are
refused unless they hold their neutral value, so a client never silently gets something else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from ..engine.options import QueryOptions

MAX_STOP_STRINGS = 4

# Field -> why it is refused. Each may still be sent empty (None, false, 0, "", [], {}) or as in NEUTRAL.
UNSUPPORTED = {
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
    "logit_bias": "logit bias is not applied",
    "presence_penalty": "repetition penalties are not applied",
    "frequency_penalty": "repetition penalties are not applied",
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "tool_choice": "tool calls are not supported",
    "function_call": "function calls are not supported",
    "response_format": "only plain text responses are produced",
    "best_of": "one candidate is generated per request",
    "echo": "the prompt is not echoed",
    "suffix": "suffixes (insertion) are not supported",
}
NEUTRAL = {
    "tool_choice": ("none",),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "best_of": (1,),
}


def _neutral(name: str, value: Any) -> bool:
    return not value or value in NEUTRAL.get(name, ())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


# Every query option as an optional extension field (None: the server's default), typed as in QueryOptions.
# The values are validated once, by QueryOptions, when the request's options are laid over the server's; strictly
# typed here, so JSON's true is not read as 1 (keep: one token) nor "0.5" as a number.
QueryOptionFields = create_model(
    "QueryOptionFields",
    __config__=ConfigDict(extra="ignore", strict=True),
    **{
        name: (field.annotation | None, Field(None, description=field.description))
        for name, field in QueryOptions.model_fields.items()
    },
)


class CommonRequest(QueryOptionFields):
    """Fields shared by both endpoints: generation settings, and the InfoFlow extension fields (the passages,
    retrieval, and the query options of :class:`QueryOptions`)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    user: str | None = None  # accepted for compatibility; requests are not attributed to users
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extension fields (the openai client sends them with extra_body={...}).
    passages: list[str] = Field(default_factory=list, description="passage texts placed before the question")
    retrieve: int | None = Field(None, description="retrieve this many passages from the server's index")
    # Refused unless neutral: see UNSUPPORTED.
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("max_tokens")
    @classmethod
    def _positive_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be >= 1, got {value}; omit it for the server default")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"n={value} is not supported: this server returns one choice per request; send n=1")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(value)}")
        if "" in ([value] if isinstance(value, str) else value or []):  # "" is found at once: every answer empty
            raise ValueError(f"stop strings must not be empty, got {value!r}; drop the empty string")
        return value

    @field_validator("retrieve")
    @classmethod
    def _positive_retrieve(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"retrieve must be >= 1 (passages to retrieve), got {value}; omit it to retrieve none")
        return value

    @field_validator("passages")
    @classmethod
    def _text_passages(cls, value: list[str]) -> list[str]:
        if empty := [i for i, p in enumerate(value) if not p.strip()]:
            raise ValueError(f"passages {empty} are empty; send passages with text, or drop them")
        return value

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> CommonRequest:
        for name, why in UNSUPPORTED.items():
            value = getattr(self, name, None)
            if not _neutral(name, value):
                raise ValueError(f"{name}={value!r} is not supported: {why}; omit {name}")
        return self

    def option_overrides(self) -> dict[str, Any]:
        """The query options this request sets (the server's defaults stand for the others)."""
        return {name: value for name in QueryOptions.model_fields if (value := getattr(self, name)) is not None}

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        """The message text; content parts (all of type text) are joined."""
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(value, list) and (kinds := sorted({str(p.get("type")) for p in value} - {"text"})):
            raise ValueError(f"content parts of type {kinds} are not supported: send text parts only")
        return value


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: Any = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _positive_completion_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_completion_tokens must be >= 1, got {value}; omit it for the server default")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(CommonRequest):
    prompt: str | list[str]
    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"prompt lists of {len(value)} prompts are not supported: send one prompt string")
        if not (value if isinstance(value, str) else value[0]).strip():
            raise ValueError("prompt is empty; send the question (and any passages) as the prompt text")
        return value

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens
