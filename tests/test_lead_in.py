"""Passages prefilled behind a lead-in: the cache it makes, exactness at full recompute, and what it refuses."""

from types import SimpleNamespace

import pytest
import torch
from conftest import PASSAGES, QUESTION

from infoflow_rag.chat import Conversations, Turn
from infoflow_rag.engine import Engine, prefill
from infoflow_rag.engine.cache import stacked
from infoflow_rag.engine.lead_in import NEUTRAL_LEAD_IN
from infoflow_rag.engine.selection import recomputable_passages
from infoflow_rag.eval import fidelity
from infoflow_rag.eval.datasets import EvalExample
from infoflow_rag.eval.methods import engines_for, parse_method
from infoflow_rag.eval.results import read_results
from infoflow_rag.eval.runner import DEFAULT_PROMPT, run_eval
from infoflow_rag.ingest import fitting_passages

LEAD_IN = "A neutral paragraph: nothing here is about the question."


def test_a_passage_is_prefilled_behind_the_head_and_the_lead_in(engine):
    lead = engine.replace(lead_in=LEAD_IN)
    head, lead_ids = engine.prefix.token_ids.tolist(), engine.passage_ids(LEAD_IN)
    plain = engine.prefill(PASSAGES)
    for kv, alone in zip(lead.prefill(PASSAGES), plain, strict=True):
        assert kv.offset == len(head) + len(lead_ids)
        # One plain forward of head + lead-in + passage: the passage's K/V there, at the same positions.
        keys, values = stacked(prefill.full_prefill(engine.model, head + lead_ids + kv.token_ids.tolist()).cache)
        assert torch.allclose(kv.keys, keys[:, 0, :, kv.offset :], atol=1e-5)
        assert torch.allclose(kv.values, values[:, 0, :, kv.offset :], atol=1e-5)
        assert not torch.allclose(kv.values, alone.values, atol=1e-3)  # the lead-in is seen


def test_full_recompute_behind_a_lead_in_reproduces_full_prefill(family_engine):
    lead = family_engine.replace(lead_in=LEAD_IN)
    kvs = lead.prefill(PASSAGES)
    _, reference = lead.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=1)
    assert torch.equal(reference, family_engine.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=1)[1])
    for selector in ("infoflow", "sinkflow", "epic"):
        prep = lead.prepare(QUESTION, kvs, selector=selector, ratio=1.0)
        assert (prep.out.logits - reference).abs().max() <= 1e-4, selector


def test_no_passage_is_exact_behind_a_lead_in(engine):
    lead = engine.replace(lead_in=LEAD_IN)
    placed = lead.prepare(QUESTION, lead.prefill(PASSAGES), selector="none").placed
    assert [p for p, _, _ in recomputable_passages(placed)] == list(range(len(PASSAGES)))  # the first one too
    prep = lead.prepare(QUESTION, lead.prefill(PASSAGES), selector="epic", ratio=0.5)
    first_start, first_end = prep.placed.spans[0][1:]
    assert ((prep.chosen >= first_start) & (prep.chosen < first_end)).any()  # its head is repaired like the others


def test_a_cache_from_the_other_context_is_refused_with_what_it_was_prefilled_behind(engine):
    lead = engine.replace(lead_in=LEAD_IN)
    with pytest.raises(ValueError, match="this engine's prefix and lead-in is"):
        lead.answer(QUESTION, engine.prefill(PASSAGES[:1]))
    with pytest.raises(ValueError, match="this engine's prefix is"):
        engine.answer(QUESTION, lead.prefill(PASSAGES[:1]))


def test_a_lead_in_changes_the_store_key_and_the_run_header_and_no_lead_in_changes_neither(engine):
    again = engine.replace()
    assert again.fingerprint == engine.fingerprint and "lead_in" not in engine.model_info
    assert "lead_in" not in engine.identity  # the key a store written before lead-ins existed holds
    one, other = engine.replace(lead_in=LEAD_IN), engine.replace(lead_in=NEUTRAL_LEAD_IN)
    assert len({engine.fingerprint, one.fingerprint, other.fingerprint}) == 3
    assert other.model_info["lead_in"] == NEUTRAL_LEAD_IN


@pytest.mark.parametrize("lead_in", ["", "  \n"])
def test_an_empty_lead_in_is_refused(engine, lead_in):
    with pytest.raises(ValueError, match="lead_in is empty; pass None"):
        engine.replace(lead_in=lead_in)


def test_the_engine_a_system_prompt_gets_keeps_the_lead_in(engine):
    conversations = Conversations(SimpleNamespace(engine=engine.replace(lead_in=LEAD_IN)))
    turns = [Turn(role="system", content="Answer in one word."), Turn(role="user", content=QUESTION)]
    pipeline = conversations._pipeline_for(turns)
    assert pipeline.engine.format.head != engine.format.head and pipeline.engine.lead_in == LEAD_IN


def test_a_long_document_is_cut_into_windows_that_fit_behind_the_lead_in(engine):
    lead = engine.replace(lead_in=LEAD_IN)
    long_text = " ".join(f"w{i}" for i in range(1500))  # 7,390 byte tokens: over the 4,096 positions
    windows = fitting_passages(lead, [long_text], window=lead.max_positions)
    assert len(windows) > 1
    assert all(len(lead.passage_ids(w)) + len(lead.passage_context) <= lead.max_positions for w in windows)


def test_a_lead_in_that_is_not_a_text_is_refused_by_its_value(engine):
    with pytest.raises(ValueError, match=r"lead_in must be a text or None, got \['text'\]"):
        engine.replace(lead_in=["text"])


def test_replace_changes_only_the_settings_it_is_given(engine):
    lead = engine.replace(lead_in=LEAD_IN)
    assert lead.loaded is engine.loaded and lead.settings == {**engine.settings, "lead_in": LEAD_IN}
    assert lead.replace(lead_in=None).fingerprint == engine.fingerprint
    with pytest.raises(TypeError, match=r"unknown engine settings \['lead'\]; settings are: system_prompt"):
        engine.replace(lead="text")


def test_the_eval_runner_answers_leadin_methods_over_lead_in_caches(engine, tmp_path):
    example = EvalExample("q0", QUESTION, ["Paris"], PASSAGES, {}, "toy")
    methods = [parse_method(m) for m in ("full", "none", "none+leadin", "sinkflow+leadin@1")]
    path = tmp_path / "r.jsonl"
    results = {r.method: r for r in run_eval(engine, [example], methods, path, progress=False, command="eval")}
    full, none, lead_none, lead_full = (results[m.key] for m in methods)
    # Recomputing everything over lead-in caches is full prefill; recomputing nothing reads those caches.
    assert lead_full.answer_ids == full.answer_ids and lead_full.kl_answer == pytest.approx(0.0, abs=1e-6)
    lead = engine.replace(lead_in=NEUTRAL_LEAD_IN)
    prep = lead.prepare(QUESTION, lead.prefill(PASSAGES), selector="none", template=DEFAULT_PROMPT, max_new_tokens=32)
    reference = fidelity.reference(
        full.answer_ids,
        engine.teacher_force(
            engine.prepare(QUESTION, PASSAGES, selector="full", template=DEFAULT_PROMPT), full.answer_ids
        ),
    )
    expected = fidelity.answer_fidelity(reference, lead.teacher_force(prep, full.answer_ids))["kl_answer"]
    assert lead_none.kl_answer == pytest.approx(expected, rel=1e-4) and lead_none.kl_answer != none.kl_answer
    assert [r.lead_in for r in (full, none, lead_none, lead_full)] == [False, False, True, True]
    assert [r.spec for r in read_results(path).results] == methods  # the flag survives the file


def test_engine_settings_for_an_engine_already_built_are_refused(engine, tmp_path):
    from infoflow_rag.pipeline import Pipeline

    with pytest.raises(ValueError, match="apply to a model name; this engine is built already"):
        Pipeline.open(tmp_path / "index", model=engine, engine_settings={"lead_in": LEAD_IN}, create=True)
    assert not (tmp_path / "index").exists()


def test_the_grammar_alone_decides_which_cache_a_method_reads(engine, tmp_path):
    example = EvalExample("q0", QUESTION, ["Paris"], PASSAGES, {}, "toy")
    methods = [parse_method(m) for m in ("full", "none", "none+leadin")]
    lead = engine.replace(lead_in=NEUTRAL_LEAD_IN)
    runs = {
        name: run_eval(e, [example], methods, tmp_path / f"{name}.jsonl", progress=False, command="eval")
        for name, e in (("plain", engine), ("lead", lead))
    }
    # An engine with a lead-in runs 'none' over plain caches all the same, and writes the same header.
    assert [r.kl_answer for r in runs["lead"]] == pytest.approx([r.kl_answer for r in runs["plain"]], rel=1e-5)
    infos = [read_results(tmp_path / f"{name}.jsonl").header.model_info for name in runs]
    assert infos[0] == infos[1] and infos[0]["leadin_methods_lead_in"] == NEUTRAL_LEAD_IN
    assert "lead_in" not in infos[0]  # the plain engine's own info


def test_a_run_is_not_resumed_under_another_lead_in(engine, tmp_path, monkeypatch):
    example = EvalExample("q0", QUESTION, ["Paris"], PASSAGES, {}, "toy")
    path = tmp_path / "r.jsonl"
    run_eval(engine, [example], [parse_method("none+leadin")], path, progress=False, command="eval")
    monkeypatch.setattr("infoflow_rag.eval.methods.NEUTRAL_LEAD_IN", LEAD_IN)  # the constant changed since
    with pytest.raises(ValueError, match="cannot resume .*leadin_methods_lead_in"):
        run_eval(engine, [example], [parse_method("none+leadin")], path, progress=False, command="eval")


def test_an_engine_that_cannot_change_its_lead_in_is_refused_by_name():
    with pytest.raises(TypeError, match="SimpleNamespace has no replace.*over lead-in caches"):
        engines_for(SimpleNamespace(), [parse_method("none"), parse_method("none+leadin")])
    plain = SimpleNamespace()
    assert engines_for(plain, [parse_method("none")]) == {False: plain}


def test_by_default_passages_are_prefilled_behind_the_neutral_lead_in_and_answered_with_sinkflow(model_dir):
    default = Engine.load(model_dir)  # what a user who names only the model gets
    assert default.lead_in == NEUTRAL_LEAD_IN
    kvs = default.prefill(PASSAGES)
    assert kvs[0].offset == len(default.passage_context) > len(default.prefix)
    result = default.answer(QUESTION, kvs, max_new_tokens=1)
    assert result.options.selector == "sinkflow" and result.selected[0]  # the first passage's head is repaired too
