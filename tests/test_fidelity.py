"""The teacher-forced fidelity measures measure: exact at the limit, positive where the cache is stale,
equal to what greedy decoding saw, and carried through the eval runner (also across a resume)."""

import math

import pytest
import torch
from conftest import PASSAGES, QUESTION

from infoflow_rag.engine.prefill import full_prefill
from infoflow_rag.eval import fidelity
from infoflow_rag.eval.datasets import EvalExample
from infoflow_rag.eval.methods import parse_method
from infoflow_rag.eval.results import QuestionResult, read_results
from infoflow_rag.eval.runner import run_eval

MAX_NEW = 8


def _greedy_with_logits(engine, max_new: int) -> tuple[list[int], torch.Tensor]:
    """Plain full prefill and a hand-written greedy loop: the tokens and every logits row it picked from."""
    out = full_prefill(engine.model, engine.prompt_ids(QUESTION, PASSAGES))
    rows, tokens = [out.logits], []
    for step in range(max_new):
        token = int(rows[-1].argmax())
        if token in engine.eos_ids:
            break
        tokens.append(token)
        with torch.inference_mode():
            logits = engine.model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[out.next_position + step]]),
                cache=out.cache,
            ).logits[0, -1]
        rows.append(logits.float())
    return tokens, torch.stack(rows[: len(tokens) + 1])


def _measures(engine, kvs, reference: fidelity.Reference, selector: str, ratio: float) -> dict[str, float]:
    prep = engine.prepare(QUESTION, kvs, selector=selector, ratio=ratio, max_new_tokens=MAX_NEW)
    return fidelity.answer_fidelity(reference, engine.teacher_force(prep, reference.answer_ids))


def test_teacher_forced_logits_equal_greedy_decoding_logits(family_engine):
    e = family_engine
    tokens, greedy_rows = _greedy_with_logits(e, MAX_NEW)
    prep = e.prepare(QUESTION, PASSAGES, selector="full", max_new_tokens=MAX_NEW)
    before = e.teacher_force(prep, tokens)
    decoded = e.decode(prep, max_new_tokens=MAX_NEW)
    after = e.teacher_force(prep, tokens)  # decoding appended to the cache: teacher forcing cuts it back first
    assert decoded.answer_ids == tokens
    assert before.shape == (len(tokens) + 1, e.model.config.vocab_size)
    assert (before - greedy_rows).abs().max() <= 1e-4
    assert (after - before).abs().max() <= 1e-5
    assert prep.out.cache.layers[0].keys.shape[2] == prep.out.positions.numel()  # the prompt only, again


def test_fidelity_is_exact_at_full_recompute_and_positive_without_recompute(family_engine):
    e = family_engine
    kvs = e.prefill(PASSAGES)
    prep = e.prepare(QUESTION, PASSAGES, selector="full", max_new_tokens=MAX_NEW)
    answer_ids = e.decode(prep, max_new_tokens=MAX_NEW).answer_ids
    reference = fidelity.reference(answer_ids, e.teacher_force(prep, answer_ids))
    itself = _measures(e, PASSAGES, reference, "full", 1.0)
    assert (itself["kl_first"], itself["kl_answer"], itself["top1"]) == (0.0, 0.0, 1.0)
    m = len(answer_ids) + 1
    assert itself["kl_positions"] == [0.0] * m and itself["top1_positions"] == [True] * m
    assert all(0 < p <= 1 for p in itself["p_positions"]) and len(itself["p_positions"]) == m
    exact = {sel: _measures(e, kvs, reference, sel, 1.0) for sel in ("infoflow", "cacheblend", "epic", "random")}
    for selector, m in exact.items():
        assert m["kl_first"] < 1e-9 and m["kl_answer"] < 1e-9, selector
        assert m["top1"] == 1.0, selector
    stale = _measures(e, kvs, reference, "none", 0.15)
    assert stale["kl_answer"] > 1e-6
    assert stale["kl_answer"] > 1000 * max(m["kl_answer"] for m in exact.values())


def test_gold_nll_is_the_mean_negative_log_likelihood_of_the_gold_tokens():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])  # the last row follows the answer
    expected = -(math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(math.e / (math.e + 2))) / 2
    assert fidelity.gold_nll(logits, [0, 1]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no tokens"):
        fidelity.gold_nll(logits, [])


def test_position_fidelity_is_what_the_answer_means_are_made_of():
    full = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # answer [0], then what follows it (token 1)
    method = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # same first row; the second ranks token 0 first
    reference = fidelity.reference([0], full)
    at = fidelity.position_fidelity(reference, method)
    p = full[1].softmax(-1)
    assert at.kl[0] == pytest.approx(0.0, abs=1e-12)
    assert at.kl[1] == pytest.approx(float((p * (p.log() - method[1].log_softmax(-1))).sum()))
    assert at.same_top.tolist() == [True, False]
    # The method's probability of full's token: token 0 in the first row, token 1 in the second.
    assert at.p_full_token.tolist() == pytest.approx([float(method[0].softmax(-1)[0]), float(method[1].softmax(-1)[1])])
    stored = fidelity.answer_fidelity(reference, method)
    assert stored["kl_answer"] == pytest.approx(float(at.kl.mean())) and stored["top1"] == 0.5
    assert stored["kl_positions"] == pytest.approx(at.kl.tolist(), abs=1e-6)
    assert stored["top1_positions"] == [True, False]
    assert stored["p_positions"] == pytest.approx(at.p_full_token.tolist(), abs=1e-4)
    assert stored["kl_positions"][0] == 0.0 and stored["kl_answer"] == pytest.approx(sum(stored["kl_positions"]) / 2)


def test_answer_fidelity_refuses_misaligned_logits():
    reference = fidelity.reference([1, 2], torch.zeros(3, 5))
    with pytest.raises(ValueError, match="do not align"):
        fidelity.answer_fidelity(reference, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="need 3 rows"):
        fidelity.reference([1, 2], torch.zeros(2, 5))


def test_runner_records_fidelity_and_rebuilds_the_reference_on_resume(engine, tmp_path):
    examples = [EvalExample(f"q{i}", QUESTION, ["Canberra"], PASSAGES[i:] + PASSAGES[:i], {}, "toy") for i in range(2)]
    path = tmp_path / "r.jsonl"
    first = run_eval(
        engine,
        examples,
        [parse_method(m) for m in ("full", "none")],
        path,
        max_new_tokens=MAX_NEW,
        progress=False,
        command="eval",
    )
    # A second start adds a method: full is not decoded again, its reference is rebuilt from its stored tokens.
    methods = [parse_method(m) for m in ("full", "none", "infoflow@1.0")]
    results = run_eval(engine, examples, methods, path, max_new_tokens=MAX_NEW, progress=False, command="eval")
    assert results[:2] == first[:2]
    by_key = {r.pair_key[1:]: r for r in read_results(path).results}
    for i in range(2):
        full, none, exact = (by_key[(f"q{i}", m)] for m in ("full", "none", "infoflow@1"))
        assert full.answer_ids is not None and (full.kl_answer, full.top1) == (0.0, 1.0)
        assert full.kl_positions == [0.0] * (len(full.answer_ids) + 1)  # stored per position, and read back
        assert none.kl_answer == pytest.approx(sum(none.kl_positions) / len(none.kl_positions), abs=1e-6)
        assert exact.kl_answer < 1e-9 and exact.kl_first < 1e-9 and exact.top1 == 1.0
        assert none.kl_answer > 1e-6
        assert exact.gold_nll == pytest.approx(full.gold_nll, abs=1e-4)  # the same cache makes gold as likely
        assert full.gold_nll > 0


def test_runner_without_full_records_no_fidelity(engine, tmp_path):
    examples = [EvalExample("q0", QUESTION, ["Canberra"], PASSAGES, {}, "toy")]
    (result,) = run_eval(
        engine, examples, [parse_method("none")], tmp_path / "r.jsonl", max_new_tokens=4, progress=False, command="eval"
    )
    assert (result.kl_first, result.kl_answer, result.top1, result.gold_nll) == (None, None, None, None)
    assert result.answer_ids is not None


def test_results_from_before_the_fidelity_measures_still_load():
    old = {
        "dataset": "toy", "id": "q0", "method": "full", "name": "full", "selector": "full", "ratio": 1.0,
        "reorder": False, "geometry": "global", "prediction": "a", "raw_answer": "a", "f1": 1.0, "em": 1.0,
        "ttft": 1.0, "ttft_ratio": 1.0, "score_time": 0.0, "recompute_fraction": 1.0, "context_tokens": 10,
        "passage_order": [0], "prefill_time": None,
    }  # fmt: skip
    result = QuestionResult.from_record(old)
    assert (result.answer_ids, result.kl_answer, result.top1, result.gold_nll) == (None, None, None, None)
    assert (result.kl_positions, result.top1_positions, result.p_positions) == (None, None, None)
