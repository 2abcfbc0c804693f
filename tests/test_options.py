"""QueryOptions: one declaration and one validation of the query options, reached by every entry point."""

import argparse

import pytest
from conftest import PASSAGES, QUESTION
from langchain_infoflow import ChatInfoFlow
from llama_index.llms.infoflow import InfoFlowLLM
from pydantic import ValidationError

from infoflow_rag import InfoFlowError, InvalidOptionError, QueryOptions
from infoflow_rag.cli import main
from infoflow_rag.cli.options import add_option_flags
from infoflow_rag.eval.methods import parse_method
from infoflow_rag.serve.app import ServerSettings, _query_options
from infoflow_rag.serve.errors import APIError
from infoflow_rag.serve.schemas import CompletionRequest

# A bad value of each kind, as a keyword, and what the one validation says about it (the value and the fix).
BAD = [
    ({"ratio": 0.0}, r"ratio must be in \(0, 1\], got 0.0; e.g. 0.15"),
    ({"ratio": 1.5}, r"ratio must be in \(0, 1\], got 1.5"),
    ({"selector": "bogus"}, r"unknown selector 'bogus'; known selectors: cacheblend, epic, full, infoflow"),
    ({"compress": "snapkv", "keep": 1.5}, r"keep=1.5 as a ratio must be in \(0, 1\]; e.g. keep=0.5"),
    ({"compress": "snapkv", "keep": 0}, r"keep=0 as a token count must be >= 1; pass a float such as 0.5"),
    ({"keep": 0.5}, r"keep=0.5 needs a compression policy: set compress \(e.g. 'snapkv'\)"),
    ({"compress": "zip", "keep": 0.5}, r"unknown compression policy 'zip'; known policies:"),
    ({"score_dtype": "float16"}, r"unknown score_dtype 'float16'; choose one of bfloat16, float32"),
]
# The same values written as a method string of the eval grammar.
METHOD_OF = {
    "ratio=0.0": "infoflow@0",
    "ratio=1.5": "infoflow@1.5",
    "selector=bogus": "bogus@0.15",
    "compress=snapkv keep=1.5": "infoflow@0.15+snapkv:1.5",
    "compress=snapkv keep=0": "infoflow@0.15+snapkv:0",
    "compress=zip keep=0.5": "infoflow@0.15+zip:0.5",
    "score_dtype=float16": 'infoflow;score_dtype="float16"@0.15',
}


def _id(options: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize(("options", "message"), BAD, ids=[_id(o) for o, _ in BAD])
def test_one_validation_names_the_value_and_the_fix(options, message):
    with pytest.raises(InvalidOptionError, match=message) as info:
        QueryOptions(**options)
    assert isinstance(info.value, InfoFlowError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": True}, r"ratio must be a number in \(0, 1\], e.g. 0.15, got True"),  # pydantic: 1.0, all of it
        ({"reorder": "yes"}, "reorder must be true or false, got 'yes'"),
        ({"reorder": 1}, "reorder must be true or false, got 1"),
    ],
)
def test_values_pydantic_would_convert_are_refused(options, message):
    with pytest.raises(InvalidOptionError, match=message):
        QueryOptions(**options)
    assert QueryOptions(ratio="0.5").ratio == 0.5  # text stays accepted: flags and method strings are text


@pytest.mark.parametrize(("options", "message"), BAD, ids=[_id(o) for o, _ in BAD])
def test_every_entry_point_refuses_the_same_values_through_it(options, message, capsys):
    # the eval grammar (where it can spell the value)
    if (text := METHOD_OF.get(_id(options))) is not None:
        with pytest.raises(ValueError, match=message):
            parse_method(text)
    # the CLI: a one-line error and rc 2, before any model loads
    flags = [arg for k, v in options.items() for arg in ("--" + k.replace("_", "-"), str(v))]
    assert main(["ask", "q", "--index", "nowhere", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infoflow-rag: error: ") and err.count("\n") == 1
    assert pytest.importorskip("re").search(message, err)
    # both adapters: pydantic refuses the field with the same message
    for adapter in (ChatInfoFlow, InfoFlowLLM):
        with pytest.raises(ValidationError, match=message):
            adapter(**options)
    # the server: the request's options laid over the server's defaults are a 400 naming the value
    body = CompletionRequest(model="m", prompt="p", **options)
    with pytest.raises(APIError, match=message) as refused:
        _query_options(body, ServerSettings(model_name="m"))
    assert refused.value.status == 400


def test_every_entry_point_is_built_from_the_fields():
    """A new option needs its field in QueryOptions and the stage that reads it: the adapters inherit the field,
    the server's request and the CLI derive theirs, the eval grammar and results carry the options whole."""
    fields = set(QueryOptions.model_fields)
    assert fields <= set(ChatInfoFlow.model_fields) and fields <= set(InfoFlowLLM.model_fields)
    assert fields <= set(CompletionRequest.model_fields)
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    assert fields == {action.dest for action in parser._actions} - {"help"}


def test_overrides_are_sugar_for_replace():
    base = QueryOptions(selector="cacheblend", ratio=0.3, compress="snapkv", keep=64)
    assert base.replace(ratio=0.5) == QueryOptions(selector="cacheblend", ratio=0.5, compress="snapkv", keep=64)
    # Dependent options go with what they depend on, unless they are changed too.
    assert base.replace(compress="none").keep == 1.0
    layered = QueryOptions(selector_options={"layers": [1, 2]})
    assert layered.replace(selector="epic").selector_options == {}
    with pytest.raises(InvalidOptionError, match="bad options for selector 'epic'"):
        layered.replace(selector="epic", selector_options={"layers": [1]})
    with pytest.raises(InvalidOptionError, match="unknown option 'ratios'; options are: selector, ratio"):
        QueryOptions(ratios=0.2)


@pytest.mark.parametrize(
    ("selector_options", "message"),
    [
        (
            {"bogus": 1},
            "bad options for selector 'sinkflow': bogus=1 (no such option); its options are: sink (default 8), "
            "layers (default None), heads (default 'mean')",
        ),
        ({"sink": "x"}, "sink='x' (Input should be a valid integer"),
        ({"layers": "x"}, "layers='x' (Input should be a valid list)"),
        ({"layers": []}, "layers is empty; give the scoring layers"),
        ({"sink": -1}, "sinkflow sink must be >= 0"),
    ],
)
def test_a_bad_selector_option_is_named_with_the_options_there_are(selector_options, message):
    with pytest.raises(InvalidOptionError) as err:
        QueryOptions(selector="sinkflow", selector_options=selector_options)
    assert message in str(err.value)
    assert QueryOptions(selector="sinkflow", selector_options={"sink": 4}).selector_options == {"sink": 4}


def test_a_registry_reads_a_class_options_from_its_constructor_required_ones_included():
    from infoflow_rag.registry import Registry

    things: Registry = Registry("thing", "things")

    @things.register
    class Thing:
        name = "thing"

        def __init__(self, size: int, label: str = "x", **extra):
            self.size, self.label = size, label

    assert things.make("thing", size="3").size == 3  # converted as annotated
    with pytest.raises(ValueError, match=r"size \(required\); its options are: size, label \(default 'x'\)$"):
        things.make("thing")


def test_frozen_options_are_frozen_all_through():
    import copy
    import json
    import pickle

    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    options = QueryOptions(selector_options={"layers": [1, 2]}, json_schema=schema)
    refused = "query options are frozen, nested values included: build changed ones with options.replace"
    for change in (
        lambda: options.selector_options.__setitem__("layers", [0]),  # past validation: would fail mid-query
        lambda: options.selector_options["layers"].append(30),
        lambda: options.compress_options.update(keep=2),
        lambda: options.json_schema["required"].pop(),
        lambda: options.json_schema["properties"].clear(),
    ):
        with pytest.raises(TypeError, match=refused):
            change()
    # Still plain values to every reader: equal to what was given, JSON, copies and pickles alike.
    assert options.selector_options == {"layers": [1, 2]} and options.json_schema == schema
    assert json.loads(json.dumps(options.to_dict()))["json_schema"] == schema
    for twin in (copy.copy(options), copy.deepcopy(options), pickle.loads(pickle.dumps(options))):
        assert twin == options
        with pytest.raises(TypeError, match=refused):
            twin.json_schema["required"].append("b")
    assert options.replace(selector_options={"layers": [3]}).selector_options == {"layers": [3]}


def test_options_round_trip_and_fixed_ratios():
    options = QueryOptions(selector="sinkflow", compress="infokv", keep=256, selector_options={"sink": 4})
    assert QueryOptions.from_dict(options.to_dict()) == options and type(options.keep) is int
    assert QueryOptions(selector="none").effective_ratio == 0.0 and QueryOptions(selector="full").effective_ratio == 1
    assert QueryOptions(ratio=0.25).effective_ratio == 0.25


def test_engine_takes_options_whole_or_as_keywords(engine):
    kvs = engine.prefill(PASSAGES)
    options = QueryOptions(selector="epic", ratio=0.3)
    whole = engine.answer(QUESTION, kvs, options, max_new_tokens=3)
    sugar = engine.answer(QUESTION, kvs, selector="epic", ratio=0.3, max_new_tokens=3)
    assert whole.options == sugar.options == options and whole.answer_ids == sugar.answer_ids
    assert engine.answer(QUESTION, kvs, options, ratio=0.6, max_new_tokens=1).options.ratio == 0.6
    with pytest.raises(TypeError, match=r"unknown settings \['colour'\]; generation settings are: max_new_tokens"):
        engine.answer(QUESTION, kvs, colour="red")


def test_overflow_names_what_overflows(engine):
    window = engine.max_positions
    with pytest.raises(ValueError, match=r"the prompt fits, the answer does not; ask for at most max_new_tokens=\d+"):
        engine.prepare(QUESTION, PASSAGES, max_new_tokens=window)
    third = " ".join([PASSAGES[0]] * (window // 3 // len(engine.passage_ids(PASSAGES[0]))))
    with pytest.raises(ValueError, match="the prompt alone is .* pass fewer or shorter passages"):
        engine.prepare(QUESTION, [third] * 4)


def test_eval_grammar_spells_every_option():
    """Options without a syntax of their own are written ``;name=value``, so a new option can be evaluated as is."""
    text = 'sinkflow{20-23};selector_options={"sink":4}@0.2+snapkv:0.5'
    method = parse_method(text)
    assert method.options == QueryOptions(
        selector="sinkflow", ratio=0.2, selector_options={"layers": [20, 21, 22, 23], "sink": 4}, compress="snapkv",
        keep=0.5,
    )  # fmt: skip
    assert method.key == text and parse_method(method.key) == method
    assert parse_method("infoflow@0.15").key == "infoflow@0.15"  # options at their defaults add nothing
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        parse_method("infoflow;colour=1")
