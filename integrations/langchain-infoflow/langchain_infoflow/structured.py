"""Structured output for ChatInfoFlow: the reply is decoded under the schema's JSON grammar (the engine's
``json_schema`` option), so it is JSON that follows the schema; the output parser then validates it."""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass

# Every method is the same constrained decoding: "json_mode" included, since the schema is at hand.
METHODS = ("json_schema", "function_calling", "json_mode")
TOOL_KEYS = ("function", "parameters", "input_schema")  # an OpenAI or Anthropic tool description, not a schema


def structured_output(
    llm: BaseChatModel, schema: dict[str, Any] | type, include_raw: bool, method: str, strict: bool | None
) -> Runnable:
    """``llm`` constrained to ``schema``, then parsed: a pydantic instance for a pydantic class, else a dict.
    With ``include_raw``, a dict of the message (``raw``), the result (``parsed``) and ``parsing_error``."""
    if method not in METHODS:
        raise ValueError(
            f"method={method!r} is not supported; use one of {', '.join(METHODS)} (all constrain decoding)"
        )
    bound = llm.bind(
        json_schema=json_schema_of(schema),
        # what langchain-core reports to callbacks (on_chat_model_start's options) for structured output
        ls_structured_output_format={"kwargs": {"method": method, "strict": strict}, "schema": schema},
    )
    parser = PydanticOutputParser(pydantic_object=schema) if _is_model(schema) else JsonOutputParser()
    if not include_raw:
        return bound | parser
    # langchain-core's convention: a parsing error is returned, not raised, next to the raw message.
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")


def json_schema_of(schema: dict[str, Any] | type) -> dict[str, Any]:
    """A JSON schema dict as it is; a pydantic class (v1 or v2), TypedDict or tool description through
    langchain-core's converter (the schema it reports to callbacks)."""
    if isinstance(schema, dict) and not any(key in schema for key in TOOL_KEYS):
        return schema
    return convert_to_json_schema(schema)


def _is_model(schema: Any) -> bool:
    return isinstance(schema, type) and is_basemodel_subclass(schema)
