"""Structured output: JSON-schema-constrained decoding in the engine (tiny random-weight models) and the option
at every entry point."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Literal, TypedDict

import pytest
from conftest import PASSAGES, QUESTION
from langchain_core.exceptions import OutputParserException
from langchain_infoflow import ChatInfoFlow
from llama_index.core.prompts import PromptTemplate
from llama_index.llms.infoflow import InfoFlowLLM
from pydantic import BaseModel, Field, ValidationError

from infoflow_rag import InvalidOptionError, QueryOptions
from infoflow_rag.cli import main
from infoflow_rag.pipeline import Pipeline
from infoflow_rag.serve.app import ServerSettings, _query_options
from infoflow_rag.serve.errors import APIError
from infoflow_rag.serve.schemas import CompletionRequest
from infoflow_rag.store import open_store


class Person(BaseModel):
    name: str = Field(max_length=12)  # bounded: random weights would otherwise write until max_new_tokens
    age: int = Field(ge=0, le=120)
    colour: Literal["red", "green", "blue"]


PERSON = Person.model_json_schema()
MAX_TOKENS = 96  # a byte tokenizer spends one token per character: the longest Person is ~70


def _person(engine, kvs, **generation) -> Person:
    result = engine.answer(QUESTION, kvs, json_schema=PERSON, max_new_tokens=MAX_TOKENS, **generation)
    assert result.generated_tokens < MAX_TOKENS and result.options.json_schema == PERSON
    assert set(json.loads(result.answer)) == {"name", "age", "colour"}  # closed: no other key
    return Person.model_validate_json(result.answer)  # random weights, and still a valid Person


def test_constrained_answer_validates_against_the_schema_in_every_family(family_engine):
    _person(family_engine, family_engine.prefill(PASSAGES))


def test_sampled_constrained_answers_validate_too(engine):
    kvs = engine.prefill(PASSAGES)
    people = [_person(engine, kvs, temperature=1.0, seed=seed) for seed in range(4)]
    assert len({p.name for p in people}) > 1  # sampled: different answers, each valid


@pytest.mark.parametrize("budget", [24, 40])  # the shortest finish here is 21 byte tokens
def test_the_json_is_finished_within_the_token_budget(engine, budget):
    """Unbounded strings from random weights: the budget, not the model, ends them, and the JSON still parses."""
    kvs = engine.prefill(PASSAGES)
    schema = {"type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer"}}}
    schema["required"] = ["text", "n"]
    for seed in range(3):
        result = engine.answer(QUESTION, kvs, json_schema=schema, max_new_tokens=budget, temperature=1.0, seed=seed)
        assert set(json.loads(result.answer)) == {"text", "n"} and result.generated_tokens <= budget


def test_other_schemas_arrays_and_enums(engine):
    kvs = engine.prefill(PASSAGES)
    schema = {"type": "array", "items": {"enum": ["yes", "no", 3]}, "minItems": 1, "maxItems": 3}
    answer = json.loads(engine.answer(QUESTION, kvs, json_schema=schema, max_new_tokens=MAX_TOKENS).answer)
    assert 1 <= len(answer) <= 3 and set(answer) <= {"yes", "no", 3}
    streamed = "".join(engine.stream(QUESTION, kvs, json_schema={"type": "boolean"}, max_new_tokens=8))
    assert streamed in ("true", "false")


def test_without_the_option_the_answer_is_unchanged(engine):
    """The unconstrained path is the one every method had: full recompute still equals plain full prefill."""
    free = engine.answer(QUESTION, PASSAGES, selector="full", json_schema=None, max_new_tokens=16)
    assert free.answer == engine.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=16)[0]
    constrained = engine.answer(QUESTION, PASSAGES, selector="full", json_schema=PERSON, max_new_tokens=MAX_TOKENS)
    assert constrained.answer != free.answer and constrained.answer.startswith('{"name": "')


BAD_SCHEMAS = [
    ({"type": "bogus"}, r"json_schema cannot be enforced: .*bogus"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "json_schema cannot be enforced: .*missing"),
    ("not a schema", r"json_schema must be a JSON schema object \(a dict\), got str"),
]


@pytest.mark.parametrize(("schema", "message"), BAD_SCHEMAS, ids=["type", "ref", "str"])
def test_a_bad_schema_is_refused_at_every_entry_point(schema, message, capsys):
    with pytest.raises(InvalidOptionError, match=message) as info:
        QueryOptions(json_schema=schema)
    assert "\n" not in str(info.value)
    for adapter in (ChatInfoFlow, InfoFlowLLM):
        with pytest.raises(ValidationError, match=message):
            adapter(json_schema=schema)
    if isinstance(schema, dict):  # the server's field and the CLI flag take JSON objects only
        with pytest.raises(APIError, match=message):
            _query_options(CompletionRequest(model="m", prompt="p", json_schema=schema), ServerSettings(model_name="m"))
        assert main(["ask", "q", "--index", "nowhere", "--json-schema", json.dumps(schema)]) == 2
        assert re.search(message, capsys.readouterr().err)


# --- the framework adapters ------------------------------------------------------------------------------------


class Pet(TypedDict):
    name: Annotated[str, ..., "the pet's name"]
    kind: Literal["cat", "dog"]


@pytest.fixture(scope="module")
def tiny_pipeline(engine) -> Pipeline:
    return Pipeline(engine, open_store("memory"))


def test_with_structured_output_returns_a_validated_instance(tiny_pipeline):
    llm = ChatInfoFlow(pipeline=tiny_pipeline, max_tokens=MAX_TOKENS)
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)
    streamed = list(llm.with_structured_output(Person).stream("Describe a person."))
    assert streamed and streamed[-1] == person  # partial objects that validate, the whole one last
    for schema in (PERSON, Pet):  # a JSON schema dict, a TypedDict: dicts of the schema's keys
        for method in ("json_schema", "function_calling", "json_mode"):
            out = llm.with_structured_output(schema, method=method).invoke("Describe one.")
            assert set(out) == set(PERSON["properties"] if schema is PERSON else Pet.__annotations__)
    with pytest.raises(ValueError, match="method='xml' is not supported; use one of json_schema, function_calling"):
        llm.with_structured_output(Person, method="xml")


def test_include_raw_returns_the_message_and_a_parsing_error_instead_of_raising(tiny_pipeline):
    llm = ChatInfoFlow(pipeline=tiny_pipeline, max_tokens=MAX_TOKENS)
    out = llm.with_structured_output(Person, include_raw=True).invoke("Describe a person.")
    assert isinstance(out["parsed"], Person) and out["parsing_error"] is None
    assert Person.model_validate_json(out["raw"].content) == out["parsed"]
    assert out["raw"].usage_metadata["output_tokens"] > 1
    cut = ChatInfoFlow(pipeline=tiny_pipeline, max_tokens=4)  # too few tokens for a whole Person
    out = cut.with_structured_output(Person, include_raw=True).invoke("Describe a person.")
    assert out["parsed"] is None and isinstance(out["parsing_error"], OutputParserException)


def test_llamaindex_structured_predict_and_structured_llm_decode_under_the_schema(tiny_pipeline):
    llm = InfoFlowLLM(pipeline=tiny_pipeline, max_new_tokens=MAX_TOKENS)
    prompt = PromptTemplate("Describe a person called {name}.")
    assert isinstance(llm.structured_predict(Person, prompt, name="Ada"), Person)
    assert isinstance(asyncio.run(llm.astructured_predict(Person, prompt, name="Ada")), Person)
    assert isinstance(list(llm.stream_structured_predict(Person, prompt, name="Ada"))[-1], Person)
    response = llm.as_structured_llm(Person).complete("Describe a person.")
    assert isinstance(response.raw, Person) and Person.model_validate_json(response.text) == response.raw
