"""Exact-equivalence backbone on tiny random models of every supported family."""

import pytest
import torch
from conftest import PASSAGES, QUESTION, masked_sdpa_at, sparse_kernel_calls_during, without_attention_kernel
from tiny import tiny_model
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from infoflow_rag.engine import Engine, attention
from infoflow_rag.engine.attention import grouped_attention, merge_attention
from infoflow_rag.engine.cache import position_mask
from infoflow_rag.engine.check import rotation_error
from infoflow_rag.engine.prompt import DEFAULT_QUESTION_TEMPLATE
from infoflow_rag.engine.selection import DEFAULT_RATIO, SELECTORS, recomputable_passages, recomputable_spans
from infoflow_rag.errors import UnsupportedModelError


def test_rerotated_keys_equal_keys_at_global_positions(family_engine):
    assert rotation_error(family_engine, n_tokens=48, delta=3000) < 1e-4


def test_full_recompute_reproduces_full_prefill(family_engine):
    e = family_engine
    kvs = e.prefill(PASSAGES)
    for selector, ratio, dtype in [
        ("full", 0.15, "float32"),
        ("infoflow", 1.0, "float32"),
        ("infoflow", 1.0, "bfloat16"),  # the scoring pass's products only: the recompute stays float32
        ("sinkflow", 1.0, "bfloat16"),
        ("random", 1.0, "float32"),
    ]:
        prep = e.prepare(QUESTION, kvs, selector=selector, ratio=ratio, score_dtype=dtype)
        _, reference = e.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=1)
        assert (prep.out.logits - reference).abs().max() <= 1e-4, (selector, dtype)
    answer = e.answer(QUESTION, kvs, selector="infoflow", ratio=1.0, max_new_tokens=12).answer
    assert answer == e.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=12)[0]


def sdpa_calls_during(monkeypatch, run):
    """``run()`` with torch's SDPA spied on: its result and the keyword arguments of every SDPA call it made."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    try:
        return run(), calls
    finally:
        monkeypatch.undo()


def test_full_selector_is_the_reference_prefill_on_the_causal_kernel(engine, monkeypatch):
    # As a method, "full" must cost what the reference costs: one causal forward over the whole prompt on the
    # kernel, no masked sparse-query path, the same logits.
    kvs = engine.prefill(PASSAGES)
    n = len(engine.prompt_ids(QUESTION, PASSAGES))
    prep, calls = sparse_kernel_calls_during(monkeypatch, lambda: engine.prepare(QUESTION, kvs, selector="full"))
    assert calls == [list(range(n))] * (engine.num_layers - 1) + [[n - 1]]  # the last layer: the last row's output
    _, reference = engine.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=1)
    assert torch.equal(prep.out.logits, reference)
    assert prep.out.positions.tolist() == list(range(n))
    # The passages' K/V are not placed beside full prefill's own cache, and every passage token still counts as
    # recomputed.
    assert prep.placed is None and prep.chosen.numel() == 0
    result = engine.decode(prep, max_new_tokens=1)
    assert result.selected == {i: list(range(len(kv))) for i, kv in enumerate(kvs)}
    assert result.recompute_fraction == 1.0


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_full_prefill_reference_runs_the_causal_kernel(engine, monkeypatch, path):
    # The reference for every speedup must be the fastest plain prefill: the compiled kernel over every row's own
    # prefix or, where it did not build, SDPA's own causal path (no float mask, grouped K/V heads read in place);
    # either must agree with the explicitly masked forward.
    from infoflow_rag.engine.prefill import full_prefill

    ids = engine.prompt_ids(QUESTION, PASSAGES)
    if path == "kernel":
        out, calls = sparse_kernel_calls_during(monkeypatch, lambda: full_prefill(engine.model, ids))
        assert calls == [list(range(len(ids)))] * (engine.num_layers - 1) + [[len(ids) - 1]]
    else:
        without_attention_kernel(monkeypatch)
        out, calls = sdpa_calls_during(monkeypatch, lambda: full_prefill(engine.model, ids))
        assert calls and all(c.get("attn_mask") is None and c.get("is_causal") and c.get("enable_gqa") for c in calls)
    pos = torch.arange(len(ids))
    with torch.inference_mode():
        masked = engine.model(
            input_ids=torch.tensor(ids)[None],
            position_ids=pos[None],
            attention_mask=position_mask(pos, pos, torch.float32),
        ).logits[0, -1]
    assert (out.logits - masked).abs().max() <= 1e-4


def _concatenation_reference(e: Engine, question: str, passages: list[str]) -> torch.Tensor:
    """Independent 0 % reference: plain per-passage forwards, keys moved with transformers' own RoPE code."""
    model, prefix = e.model, e.prefix.token_ids
    rotary = model.model.rotary_emb
    keys, values = None, None
    pos = len(prefix)
    for text in passages:
        ids = torch.tensor(e.passage_ids(text))
        cache = DynamicCache()
        model(input_ids=torch.cat([prefix, ids])[None], cache=cache)
        k = torch.stack([layer.keys[0, :, len(prefix) :] for layer in cache.layers])  # (L, kvh, n, d)
        v = torch.stack([layer.values[0, :, len(prefix) :] for layer in cache.layers])
        delta = torch.full((1, ids.numel()), pos - len(prefix))
        cos, sin = rotary(k, delta)
        cos, sin = cos / rotary.attention_scaling, sin / rotary.attention_scaling
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        if keys is None:  # the prefix rows come from the first passage's forward, exact
            keys = torch.stack([layer.keys[0, :, : len(prefix)] for layer in cache.layers])
            values = torch.stack([layer.values[0, :, : len(prefix)] for layer in cache.layers])
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        pos += ids.numel()
    q_ids = torch.tensor(e.prompt_ids(question, passages)[pos:])
    q_pos = pos + torch.arange(q_ids.numel())
    cache = DynamicCache(ddp_cache_data=[(k[None], v[None]) for k, v in zip(keys, values, strict=True)])
    mask = torch.zeros(1, 1, q_ids.numel(), pos + q_ids.numel())
    mask[0, 0, :, pos:] = torch.triu(torch.full((q_ids.numel(), q_ids.numel()), float("-inf")), 1)
    out = model(input_ids=q_ids[None], position_ids=q_pos[None], attention_mask=mask, cache=cache)
    return out.logits[0, -1]


def test_zero_recompute_equals_plain_concatenation(family_engine):
    e = family_engine
    prep = e.prepare(QUESTION, e.prefill(PASSAGES), selector="none")
    assert prep.chosen.numel() == 0
    reference = _concatenation_reference(e, QUESTION, PASSAGES)
    assert (prep.out.logits - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["infoflow", "cacheblend", "epic", "random"])
@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.5])
def test_selectors_spend_exactly_their_budget(engine, name, ratio):
    kvs = engine.prefill(PASSAGES)
    prep = engine.prepare(QUESTION, kvs, selector=name, ratio=ratio)
    total = sum(len(kv) for kv in kvs)
    assert prep.chosen.numel() == max(1, int(ratio * total))
    assert torch.equal(prep.chosen, prep.chosen.unique())  # sorted, no repeats
    first_start, first_end = prep.placed.spans[0][1:]
    assert not ((prep.chosen >= first_start) & (prep.chosen < first_end)).any(), "first passage is exact"


def test_recomputable_passages_leave_out_the_exact_first_one_and_keep_passage_indices(engine):
    placed = engine.prepare(QUESTION, engine.prefill(PASSAGES), selector="none").placed
    passages = recomputable_passages(placed)
    assert [p for p, _, _ in passages] == list(range(1, len(PASSAGES)))  # passage 0 sits at its own positions
    assert passages == [span for span in placed.spans if span[0] != 0]
    assert recomputable_spans(placed) == [(s, e) for _, s, e in passages]


def test_none_and_full_budgets(engine):
    kvs = engine.prefill(PASSAGES)
    assert engine.prepare(QUESTION, kvs, selector="none").chosen.numel() == 0
    full = engine.answer(QUESTION, kvs, selector="full", max_new_tokens=2)
    assert full.recompute_fraction == 1.0


def test_epic_takes_the_head_of_each_passage(engine):
    kvs = engine.prefill(PASSAGES)
    r = engine.answer(QUESTION, kvs, selector="epic", selector_options={"k": 3}, max_new_tokens=1)
    assert r.selected == {0: [], 1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}


def test_infoflow_scores_follow_the_question(engine):
    """The attention norm is computed, finite and differs between questions (it is not a constant)."""
    kvs = engine.prefill(PASSAGES)
    a = engine.answer("Who won two Nobel prizes?", kvs, selector="infoflow", ratio=0.1, max_new_tokens=1).selected
    b = engine.answer("Where does the Rhine rise?", kvs, selector="infoflow", ratio=0.1, max_new_tokens=1).selected
    assert a != b


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_grouped_attention_matches_a_hand_computation_and_sdpa(monkeypatch, kernel):
    if not kernel:
        without_attention_kernel(monkeypatch)
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)  # GQA: 4 on 2
    mask = torch.zeros(1, 1, 3, 5).masked_fill_(torch.rand(1, 1, 3, 5) < 0.3, torch.finfo(torch.float32).min)
    logits = query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.5 + mask
    probs = logits.softmax(-1)[0, :, :, :4]  # (h, q, 4)
    ran = attention.few_row_attention(query, key, value, mask, 0.5, 4) is not None
    assert ran == kernel  # the path under test is the one that runs
    out, mean = grouped_attention(query, key, value, mask, 0.5, n_keys=4)
    assert torch.allclose(mean, probs.mean(0).pow(2).sum(0).sqrt())
    sdpa = torch.nn.functional.scaled_dot_product_attention(query, key, value, mask, scale=0.5, enable_gqa=True)
    assert torch.allclose(out, sdpa.transpose(1, 2), atol=1e-6)
    _, top = grouped_attention(query, key, None, mask, 0.5, 4, heads="max")
    assert torch.allclose(top, probs.pow(2).sum(1).sqrt().max(0).values)


def test_infoflow_head_reduction_is_an_option_that_changes_the_picks(engine):
    kvs = engine.prefill(PASSAGES)
    mean = engine.answer(QUESTION, kvs, ratio=0.3, max_new_tokens=1).selected
    picked = engine.answer(QUESTION, kvs, ratio=0.3, selector_options={"heads": "max"}, max_new_tokens=1).selected
    assert sum(map(len, picked.values())) == sum(map(len, mean.values())) and picked != mean
    with pytest.raises(ValueError, match="unknown heads 'sum'; choose one of mean, max"):
        engine.answer(QUESTION, kvs, selector_options={"heads": "sum"}, max_new_tokens=1)


def test_reorder_puts_densest_passage_last_and_keeps_all(engine):
    kvs = engine.prefill(PASSAGES)
    r = engine.answer(QUESTION, kvs, reorder=True, max_new_tokens=1)
    assert sorted(r.passage_order) == list(range(len(PASSAGES)))
    densities = _density(engine, kvs)
    assert len(set(densities.values())) > 1, "densities should differ, or the order test proves nothing"
    assert r.passage_order == sorted(range(len(PASSAGES)), key=lambda i: densities[i])
    assert densities[r.passage_order[-1]] == max(densities.values())


def _density(engine, kvs):
    """r_c of each passage (reorder's first, uncorrected scoring round), as the engine's reorder stage sees them."""
    from infoflow_rag.engine.placement import Segment
    from infoflow_rag.engine.prompt import encode_question
    from infoflow_rag.engine.query import Prompt
    from infoflow_rag.engine.reorder import density

    block = encode_question(engine.tokenizer, engine.format, QUESTION, DEFAULT_QUESTION_TEMPLATE)
    prompt = Prompt([], torch.tensor(block.token_ids), block.question)
    segments = [Segment(kv.token_ids, kv, passage=i) for i, kv in enumerate(kvs)]
    return density(engine, segments, prompt, DEFAULT_RATIO)


def test_geometries_all_run_and_recompute_globally(engine):
    kvs = engine.prefill(PASSAGES)
    for geometry in ["global", "head-local/head-prompt", "tail/tail", "head-local/tail-prompt"]:
        prep = engine.prepare(QUESTION, kvs, geometry=geometry, ratio=1.0)
        _, reference = engine.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=1)
        assert (prep.out.logits - reference).abs().max() <= 1e-4, geometry


def attention_under_the_whole_mask(monkeypatch) -> None:
    """Every sparse-query attention as one SDPA call under the whole (Q, M) mask its plan's positions imply."""
    monkeypatch.setattr(
        attention, "_sorted_queries", lambda q, k, v, positions, scale, want: masked_sdpa_at(q, k, v, positions, scale)
    )


@pytest.mark.parametrize("query_chunk", [4, attention.QUERY_CHUNK])  # fewer tokens than a question's rows, or more
def test_cacheblend_check_pass_runs_the_sparse_kernel_and_gets_the_masked_kv(engine, monkeypatch, query_chunk):
    from infoflow_rag.engine import scoring

    kvs = engine.prefill(PASSAGES)
    monkeypatch.setattr(attention, "QUERY_CHUNK", query_chunk)
    placed = engine.prepare(QUESTION, kvs, selector="cacheblend").placed
    p, n = placed.prefix_len, placed.token_ids.numel()
    (keys, values), calls = sparse_kernel_calls_during(
        monkeypatch, lambda: scoring.fresh_layer_kv(engine.model, placed, 1)
    )
    assert calls == [list(range(p, n))]  # layer 0, every token after the prefix a query, as its cache index
    attention_under_the_whole_mask(monkeypatch)
    monkeypatch.setattr(attention, "QUERY_CHUNK", query_chunk)
    masked_keys, masked_values = scoring.fresh_layer_kv(engine.model, placed, 1)
    assert keys.shape == masked_keys.shape == (engine.model.config.num_key_value_heads, n - p, keys.shape[-1])
    assert (keys - masked_keys).abs().max() <= 1e-5 and (values - masked_values).abs().max() <= 1e-5
    monkeypatch.undo()
    without_attention_kernel(monkeypatch)  # the torch path's chunks, their masks from the plan's positions
    monkeypatch.setattr(attention, "FOLDED_ROWS", 4)  # tiny model: 2 query heads per K/V head, 2 queries a chunk
    chunked_keys, chunked_values = scoring.fresh_layer_kv(engine.model, placed, 1)
    assert (chunked_keys - masked_keys).abs().max() <= 1e-5 and (chunked_values - masked_values).abs().max() <= 1e-5


def test_forwards_under_a_plan_form_no_mask(engine, monkeypatch):
    from infoflow_rag.engine import recompute, scoring

    made = []
    real = attention.sdpa_mask
    monkeypatch.setattr(attention, "sdpa_mask", lambda *args, **kwargs: made.append(1) or real(*args, **kwargs))
    prep = engine.prepare(QUESTION, engine.prefill(PASSAGES), selector="cacheblend", max_new_tokens=1)
    assert made == []  # neither the check pass nor the recompute asked transformers for a mask
    fresh = prep.layout.segments[-1]
    start = prep.layout.length - len(fresh)
    recompute.recompute(engine.model, prep.placed, prep.chosen, fresh.token_ids, start + torch.arange(len(fresh)))
    scoring.fresh_layer_kv(engine.model, prep.placed, 1)
    assert made == []
    engine.decode(prep)  # decoding runs under no plan: transformers asks for its mask, and the spy sees it
    assert made
    with attention.sparse_queries(attention.SparseQueries(torch.arange(3))):
        with pytest.raises(RuntimeError, match="5 queries under a plan of 3 positions"):
            engine.model(input_ids=torch.ones(1, 5, dtype=torch.long), cache=DynamicCache())


def test_stream_yields_the_answer_and_stops_on_stop_string(engine):
    kvs = engine.prefill(PASSAGES)
    stream = engine.stream(QUESTION, kvs, max_new_tokens=16)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.answer  # streamed, the answer adds up to what it is returned as
    full = engine.answer(QUESTION, kvs, max_new_tokens=16).answer
    assert len(full) >= 4, "the stop-string check below needs a longer answer"
    stop = full[2:4]
    cut = engine.answer(QUESTION, kvs, max_new_tokens=16, stop=(stop,)).answer
    assert stop not in cut and full.startswith(cut)
    # One string is one stop: a stop whose first character occurs earlier would cut there if read as characters.
    at = [k for k in range(1, len(full) - 1) if full[k] in full[:k] and full[k : k + 2] not in full[: k + 1]]
    assert at, f"the check below needs an answer with a repeated character: {full!r}"
    one = full[at[0] : at[0] + 2]
    assert engine.answer(QUESTION, kvs, max_new_tokens=16, stop=one).answer == full[: at[0]].strip()
    with pytest.raises(ValueError, match="stop strings must not be empty"):  # found at once: every answer empty
        engine.answer(QUESTION, kvs, max_new_tokens=16, stop=("x", ""))


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        (["  ", " a", " b ", "\n", "c\n\n", "  "], ["a", " b", " \nc"]),  # whitespace waits for the text after it
        (["", " \n"], []),
        ([" a\n", "\n", "\n b"], ["a", "\n\n\n b"]),
        (["a b", " ", " c"], ["a b", "  c"]),
    ],
)
def test_streamed_deltas_add_up_to_the_stripped_answer(deltas, expected):
    # The stream gave the model's opening space or closing newline, the returned answer not: a LangChain stream
    # added up differed from invoke's message, a server stream from the same request unstreamed.
    from infoflow_rag.engine.decoding import stripped

    assert list(stripped(iter(deltas))) == expected and "".join(expected) == "".join(deltas).strip()


def test_finish_reason_says_whether_max_new_tokens_cut_the_answer(engine):
    kvs = engine.prefill(PASSAGES)
    full = engine.answer(QUESTION, kvs, max_new_tokens=12)
    assert full.generated_tokens == 12 and full.finish_reason == "length"  # the tiny model never says EOS so soon
    texts = [engine.tokenizer.decode(full.answer_ids[:k], skip_special_tokens=True) for k in range(13)]
    # A character that first shows with token k: a stop string found at the last token allowed still ends the
    # answer by itself, "stop", not "length".
    k, char = next((k, c) for k in range(2, 13) for c in texts[k] if c != "\ufffd" and c not in "".join(texts[:k]))
    cut = engine.answer(QUESTION, kvs, max_new_tokens=k, stop=char)
    assert cut.generated_tokens == k and cut.finish_reason == "stop"
    assert engine.answer(QUESTION, kvs, max_new_tokens=k - 1, stop=char).finish_reason == "length"
    earlier = engine.answer(QUESTION, kvs, max_new_tokens=12, stop=char)
    assert earlier.generated_tokens == k and earlier.finish_reason == "stop"


def test_sampling_is_seeded(engine):
    kvs = engine.prefill(PASSAGES)
    a = engine.answer(QUESTION, kvs, temperature=1.0, seed=3, max_new_tokens=8).answer
    b = engine.answer(QUESTION, kvs, temperature=1.0, seed=3, max_new_tokens=8).answer
    assert a == b


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.answer(None, PASSAGES), "the question must be text \\(a str\\), got NoneType: None"),
        (lambda e: e.answer(QUESTION, PASSAGES, template=5), "the question template must be text .*, got int: 5"),
        (lambda e: e.answer(QUESTION, [PASSAGES[0], None]), "a passage must be text .*, got NoneType: None"),
        (lambda e: e.prefill([3]), "a passage must be text .*, got int: 3"),
    ],
)
def test_a_value_that_is_not_text_is_refused_by_name(engine, call, message):
    # None.strip() or a tokenizer's own error named neither the argument nor its type
    with pytest.raises(TypeError, match=message):
        call(engine)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda e: e.answer(QUESTION, "Acme Rockets"), "passages"),
        (lambda e: e.prefill("Acme"), "passages"),
        (lambda e: e.answer_prompt("Say hi."), "pieces"),
    ],
)
def test_one_text_where_a_list_is_due_is_refused(engine, call, name):
    # Iterated, "Acme" would be four one-character passages, answered over without a word of warning.
    with pytest.raises(TypeError, match=f"{name} must be a list, not one str .*; wrap it in a list"):
        call(engine)


def test_sampling_without_a_seed_differs_between_calls(engine):
    kvs = engine.prefill(PASSAGES)
    # At temperature 1 the tiny random model's 8-token samples differ from seed to seed (the seeded test above holds
    # one fixed); four calls all alike is what a fixed default seed gave.
    answers = {tuple(engine.answer(QUESTION, kvs, temperature=1.0, max_new_tokens=8).answer_ids) for _ in range(4)}
    assert len(answers) > 1


def test_a_tiny_temperature_samples_the_greedy_answer(engine):
    kvs = engine.prefill(PASSAGES)
    greedy = engine.answer(QUESTION, kvs, max_new_tokens=8).answer_ids
    # 1e-300 is 0 in float32: logits over it are +-inf; shifted by their largest first, the others go to -inf, not NaN
    assert engine.answer(QUESTION, kvs, temperature=1e-300, seed=5, max_new_tokens=8).answer_ids == greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a number >= 0"),
        ({"seed": 2**70}, r"seed must be an integer in \[0, 2\*\*63\) or None, got 1180591620717411303424"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"seed": -1}, "seed must be an integer"),
        ({"ratio": 0.0}, "ratio must be in"),
        ({"ratio": 1.5}, "ratio must be in"),
        ({"selector": "bogus"}, "known selectors: cacheblend, epic, full, infoflow, none, random"),
        ({"geometry": "sideways"}, "unknown geometry"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
        ({"max_new_tokens": "8"}, "max_new_tokens must be an integer >= 1, got '8'"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True"),
        ({"temperature": "0.5"}, "temperature must be a number >= 0 .*, got '0.5'"),
        ({"temperature": None}, "temperature must be a number >= 0 .*, got None"),
        ({"top_p": None}, r"top_p must be a number in \(0, 1\], got None"),
        ({"stop": ["x", None]}, r"stop must be a string or a list of strings, got \['x', None\]"),
        ({"stop": 5}, "stop must be a string or a list of strings, got 5"),
        ({"stop": ["}"], "json_schema": {"type": "object"}}, r"stop \['}'\] cannot be combined with json_schema"),
        ({"selector_options": {"layers": [1, 99]}}, r"scoring layers \[99\] out of range"),
        ({"score_rows": "all"}, "unknown score_rows 'all'; choose one of question, block"),
    ],
)
def test_bad_arguments_raise_clear_errors(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.answer(QUESTION, PASSAGES, **kwargs)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.answer(QUESTION, PASSAGES, max_tokens=3), r"unknown settings \['max_tokens'\]; .*max_new_tokens"),
        (lambda e: e.answer_prompt(["Say hi."], foo=1), r"unknown settings \['foo'\]; .*query options are: selector"),
        (lambda e: e.full_prefill_answer(QUESTION, PASSAGES, max_token=3), r"unknown settings \['max_token'\]"),
        (lambda e: e.answer(QUESTION, PASSAGES, options=3), "options must be a QueryOptions, got 3; pass QueryOptions"),
        (lambda e: e.answer(QUESTION, PASSAGES, {"selector": "epic"}), "options must be a QueryOptions, got {'sel"),
    ],
)
def test_unknown_keywords_and_options_that_are_not_options_are_named(engine, call, message):
    # They failed inside GenerationConfig ("__init__() got an unexpected keyword argument"), a class no caller
    # names, or as "'int' object has no attribute 'split'"; the LlamaIndex adapter passes its kwargs on to these.
    with pytest.raises(TypeError, match=message):
        call(engine)


def test_empty_inputs_and_overlong_passages_raise(engine):
    with pytest.raises(ValueError, match="no passages"):
        engine.answer(QUESTION, [])
    with pytest.raises(ValueError, match="empty passage"):
        engine.answer(QUESTION, ["fine", "  "])
    with pytest.raises(ValueError, match="context window"):
        engine.answer(QUESTION, ["x" * 5000])
    with pytest.raises(ValueError, match="context window"):
        engine.answer(QUESTION, ["y" * 1500] * 3)
    with pytest.raises(ValueError, match="the prompt alone is .* tokens, which leaves no room for an answer"):
        engine.full_prefill_answer(QUESTION, ["y" * 1500] * 3)  # the eval runner's reference: refused alike


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, "dynamic-NTK"),
        (
            {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 1024,
            },
            "LongRoPE",
        ),
    ],
)
def test_length_dependent_rope_is_refused(rope, message):
    loaded = tiny_model("llama")
    loaded.model.config.rope_parameters = rope
    with pytest.raises(UnsupportedModelError, match=message):
        Engine.load(loaded)


def test_sliding_window_and_foreign_architectures_are_refused():
    loaded = tiny_model("mistral")
    loaded.model.config.sliding_window = 64
    with pytest.raises(UnsupportedModelError, match="sliding_window=64"):
        Engine.load(loaded)
    loaded = tiny_model("llama")
    loaded.model.config.model_type = "gpt2"
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        Engine.load(loaded)


def test_gate_refuses_a_model_whose_keys_do_not_rotate():
    """A model whose RoPE drifts with length (like dynamic NTK, but hidden from the config) is refused."""
    loaded = tiny_model("llama")
    rotary = loaded.model.model.rotary_emb

    def drifting(x, position_ids):
        scale = 1.0 + 0.01 * float(position_ids.max() > 256)
        freqs = position_ids[..., None].float() * rotary.inv_freq * scale
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rotary.forward = drifting
    with pytest.raises(UnsupportedModelError, match="correctness gate failed"):
        Engine.load(loaded)


def test_passage_kv_from_another_prefix_is_refused(engine):
    kv = engine.prefill(PASSAGES[:1])[0]
    kv.offset += 1
    with pytest.raises(ValueError, match="prefilled behind"):
        engine.answer(QUESTION, [kv])


def test_registry_lists_every_selector():
    assert set(SELECTORS) == {"infoflow", "sinkflow", "cacheblend", "epic", "random", "none", "full"}


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("selector", ["random", "infoflow", "sinkflow", "epic"])
def test_sparse_recompute_attention_equals_one_full_mask_call(engine, monkeypatch, selector, path):
    """The compiled kernel, and the torch path's query chunks (keys before the chunk merged with the chunk's masked
    span), give what one SDPA call with the whole mask gives."""
    from infoflow_rag.engine import attention, recompute

    long_passages = [p * 6 for p in PASSAGES]  # enough queries for several chunks
    prep = engine.prepare(QUESTION, engine.prefill(long_passages), selector=selector, ratio=0.4)
    fresh = prep.layout.segments[-1]
    start = prep.layout.length - len(fresh)
    args = (engine.model, prep.placed, prep.chosen, fresh.token_ids, start + torch.arange(len(fresh)))
    if path == "kernel":
        sparse, calls = sparse_kernel_calls_during(monkeypatch, lambda: recompute.recompute(*args).logits)
        assert len(calls) == engine.num_layers
    else:
        without_attention_kernel(monkeypatch)
        monkeypatch.setattr(attention, "FOLDED_ROWS", 64)  # tiny model: 2 query heads per K/V head, 32 queries a chunk
        assert prep.chosen.numel() > 3 * 32  # several chunks, each after the first with keys before it
        sparse = recompute.recompute(*args).logits
    attention_under_the_whole_mask(monkeypatch)
    whole = recompute.recompute(*args).logits
    assert (sparse - whole).abs().max() <= 1e-5


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (14, 2)])
def test_chunked_attention_equals_masked_sdpa_for_grouped_heads(monkeypatch, heads, kv_heads):
    from infoflow_rag.engine import attention

    torch.manual_seed(0)
    positions = torch.tensor([0, 1, 5, 6, 7, 20, 21, 40, 41, 42, 43, 60])  # sorted picks, then a fresh tail
    keys = 64
    query = torch.randn(1, heads, positions.numel(), 8)
    key, value = torch.randn(2, 1, kv_heads, keys, 8).unbind(0)
    mask = position_mask(positions, torch.arange(keys), torch.float32)  # (1, 1, Q, keys)
    monkeypatch.setattr(attention, "FOLDED_ROWS", 3 * heads // kv_heads)  # chunks of 3 queries: 4 chunks
    out, _ = attention.chunked_attention(query, key, value, attention.SparseQueries(positions), 0.3)
    sdpa = torch.nn.functional.scaled_dot_product_attention(query, key, value, mask, scale=0.3, enable_gqa=True)
    assert out.shape == (1, positions.numel(), heads, 8)
    assert (out - sdpa.transpose(1, 2)).abs().max() <= 1e-6


def test_span_masks_are_the_whole_masks_slices_built_once_per_plan(monkeypatch):
    from infoflow_rag.engine import attention

    positions = torch.tensor([2, 3, 9, 10, 11, 30])
    monkeypatch.setattr(attention, "FOLDED_ROWS", 4)  # 2 queries a chunk
    plan = attention.SparseQueries(positions)
    whole = position_mask(positions, torch.arange(32), torch.float32)  # (1, 1, 6, 32)
    masks = plan.span_masks(group=2, dtype=torch.float32)
    assert len(masks) == len(plan.chunks(2)) == 3
    for (a, z), mask in zip(plan.chunks(2), masks, strict=True):
        first, end = int(positions[a]), int(positions[z - 1]) + 1
        assert torch.equal(mask, whole[:, :, a:z, first:end].repeat(1, 1, 2, 1))  # rows repeated per folded head
    assert all(a is b for a, b in zip(masks, plan.span_masks(group=2, dtype=torch.float32), strict=True))  # once


def test_query_chunks_tile_the_queries_within_the_row_and_span_limits(monkeypatch):
    from infoflow_rag.engine import attention

    monkeypatch.setattr(attention, "FOLDED_ROWS", 8)
    monkeypatch.setattr(attention, "CHUNK_SPAN", 100)
    positions = torch.tensor([0, 5, 50, 99, 100, 101, 102, 103, 104, 105, 400, 1000])
    chunks = attention.SparseQueries(positions).chunks(group=2)  # at most 4 queries (8 rows) a chunk
    assert chunks == [(0, 4), (4, 8), (8, 10), (10, 11), (11, 12)]  # 99 - 0 < 100; 4 queries; span; span; end
    assert attention.SparseQueries(positions).chunks(group=16) == [(a, a + 1) for a in range(12)]  # 1 a chunk


def test_merged_attention_over_two_key_sets_is_attention_over_their_union():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)

    def part(keys: slice):
        logits = q @ k[:, :, keys].transpose(-1, -2)  # (1, 2, 3, n)
        return logits.softmax(-1) @ v[:, :, keys], logits.logsumexp(-1)

    merged = merge_attention(*part(slice(0, 7)), *part(slice(7, 10)))
    assert (merged - part(slice(0, 10))[0]).abs().max() <= 1e-6


def test_question_scores_in_prompt_slots_equal_scores_over_a_copied_cache(engine):
    """The question written into its own prompt slots scores as it does appended to a copy of the cache, and
    the placed keys are left as they were."""
    from infoflow_rag.engine import scoring
    from infoflow_rag.engine.placement import place

    layout = engine.prepare(QUESTION, engine.prefill(PASSAGES), selector="infoflow").layout
    placed = place(layout, engine.inv_freq, engine.model.dtype)
    assert placed.cached_first and placed.keys.data_ptr() == placed.prompt_keys.data_ptr()
    keys = placed.keys.clone()
    layers = engine.score_layers
    in_slots = scoring.question_attention_scores(engine.model, placed, layout.query_ids, layers)
    copied = scoring.attention_scores(
        engine.model, placed.keys, placed.values, layout.query_ids, placed.query_positions, layers
    )
    assert (in_slots - copied).abs().max() <= 1e-6
    assert torch.equal(placed.keys, keys)


def test_score_rows_pick_the_raw_question_or_the_whole_question_block(engine):
    from infoflow_rag.engine.prompt import encode

    kvs = engine.prefill(PASSAGES)
    question = engine.prepare(QUESTION, kvs)
    block = engine.prepare(QUESTION, kvs, score_rows="block")
    tail = block.layout.segments[-1]
    assert question.layout.query_ids.tolist() == encode(engine.tokenizer, QUESTION)
    assert torch.equal(block.layout.query_ids, tail.token_ids)
    assert block.layout.query_positions.tolist() == list(range(block.layout.length - len(tail), block.layout.length))
    assert len(block.chosen) == len(question.chosen)  # the same budget, only the scoring rows differ


def test_sinkflow_spends_the_budget_on_passage_heads_then_question_attention(engine):
    kvs = engine.prefill(PASSAGES)
    r = engine.answer(QUESTION, kvs, selector="sinkflow", selector_options={"sink": 2}, ratio=0.3, max_new_tokens=1)
    info = engine.answer(QUESTION, kvs, selector="infoflow", ratio=0.3, max_new_tokens=1)
    assert sum(map(len, r.selected.values())) == sum(map(len, info.selected.values()))  # the same budget
    assert r.selected[0] == [] and all(r.selected[p][:2] == [0, 1] for p in (1, 2, 3))  # first passage is exact
    again = engine.answer(QUESTION, kvs, selector="sinkflow", selector_options={"sink": 2}, ratio=0.3, max_new_tokens=1)
    assert again.selected == r.selected  # deterministic
    plain = engine.answer(QUESTION, kvs, selector="sinkflow", selector_options={"sink": 0}, ratio=0.3, max_new_tokens=1)
    assert plain.selected == info.selected  # sink 0 is InfoFlow


def test_sinkflow_shares_a_short_budget_round_robin(engine):
    kvs = engine.prefill(PASSAGES)
    prep = engine.prepare(QUESTION, kvs, selector="sinkflow", selector_options={"sink": 4}, ratio=0.05)
    starts = [s for _, s, _ in prep.placed.spans[1:]]  # the three recomputed passages
    budget = prep.chosen.numel()
    assert 3 <= budget < 12, "the check needs a budget below 3 passages x 4 sink tokens"
    expected = sorted(s + offset for offset in range(4) for s in starts)
    expected = sorted(sorted(expected, key=lambda i: (min(i - s for s in starts if i >= s), i))[:budget])
    assert prep.chosen.tolist() == expected


def test_sinkflow_is_exact_at_full_recompute_and_checks_its_options(engine):
    kvs = engine.prefill(PASSAGES)
    prep = engine.prepare(QUESTION, kvs, selector="sinkflow", ratio=1.0)
    _, reference = engine.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=1)
    assert (prep.out.logits - reference).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="sink must be >= 0"):
        engine.answer(QUESTION, kvs, selector="sinkflow", selector_options={"sink": -1}, max_new_tokens=1)
