"""The selector study's instruments (scripts/), on a tiny random-weight model: stale_gap's pairing of the stale
cache with full prefill's, the gradients the effect oracle and the self-sensitivity signals rest on (checked
against finite differences), and the small helpers the tables are built from."""

import dataclasses
import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import PASSAGES, QUESTION

from infoflow_rag.engine import Engine, query
from infoflow_rag.engine.placement import rotate_keys
from infoflow_rag.engine.selection import SELECTORS, Probe, passage_heads, recomputable_spans
from infoflow_rag.eval.datasets import EvalExample
from infoflow_rag.eval.metrics import exact_match
from infoflow_rag.eval.results import read_results

NOTHING = torch.empty(0, dtype=torch.long)
SCRIPTS = str(Path(__file__).parent.parent / "scripts")


@pytest.fixture(scope="module")
def study():
    """The study scripts as modules. They register their study selectors in the library's registry on import:
    imported here rather than at collection, and the registry is put back afterwards, so no other test sees them."""
    registered = dict(SELECTORS)
    sys.path.insert(0, SCRIPTS)
    try:
        yield SimpleNamespace(
            **{
                name: importlib.import_module(name)
                for name in (
                    "selector_study",
                    "stale_gap",
                    "self_sensitivity",
                    "oracle_ranker",
                    "sink_attention",
                    "stale_calibration",
                    "paired_methods",
                )
            }
        )
    finally:
        sys.path.remove(SCRIPTS)
        SELECTORS.clear()
        SELECTORS.update(registered)


@pytest.fixture(scope="module")
def question(engine: Engine, study):
    q, _ = study.stale_gap.load_question(engine, EvalExample("t0", QUESTION, ["Canberra"], PASSAGES))
    return q


def test_the_stale_cache_deviates_and_patching_every_entry_restores_full_prefill(question):
    stale = question.forced(NOTHING)
    assert stale["kl_answer"] > 1e-4 and stale["residual"] == 1.0  # something to repair: the checks below bite
    every = torch.arange(question.placed.token_ids.numel())
    patched = question.forced(NOTHING, patch_tokens=every)
    assert patched["kl_answer"] < 1e-6 and patched["top1"] == 1.0 and patched["residual"] == 0.0


@torch.no_grad()
def test_answer_kl_is_the_teacher_forced_kl_summed_over_the_answer(question, study):
    positions = len(question.ref.answer_ids) + 1
    stale = float(study.stale_gap.answer_kl(question, question.stale_k, question.stale_v))
    assert stale / positions == pytest.approx(question.forced(NOTHING)["kl_answer"], rel=1e-4, abs=1e-7)
    assert float(study.stale_gap.answer_kl(question, question.fresh_k, question.fresh_v)) < 1e-6 * positions


def _perturbed(q, token: int, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The stale cache moved ``step`` of the way to full's entries at one placed token, on every layer."""
    keys, values = q.stale_k.clone(), q.stale_v.clone()
    entry = q.positions[token]
    keys[:, :, entry] += step * (q.fresh_k[:, :, entry] - q.stale_k[:, :, entry])
    values[:, :, entry] += step * (q.fresh_v[:, :, entry] - q.stale_v[:, :, entry])
    return keys, values


def test_effect_attribution_is_the_directional_derivative_of_the_answer_kl(question, study):
    attribution = study.stale_gap.effect_attribution(question, NOTHING)  # (N,)
    token = int(attribution.abs().argmax())
    eps = 1e-2
    with torch.no_grad():
        up, down = (float(study.stale_gap.answer_kl(question, *_perturbed(question, token, s))) for s in (eps, -eps))
    assert (up - down) / (2 * eps) == pytest.approx(float(attribution[token]), rel=0.05)


def test_sensitivity_is_the_squared_gradient_norm_of_the_first_token(engine, question, study):
    placed, layout = question.placed, question.layout
    signals = study.self_sensitivity.sensitivity(engine, placed, layout)
    fresh_ids, fresh_pos = query.fresh_inputs(layout)
    keys, values = placed.prompt_keys.clone(), placed.prompt_values.clone()
    with torch.no_grad():
        greedy = int(study.stale_gap.cache_forward(engine.model, keys, values, fresh_ids, fresh_pos)[-1].argmax())
    layer, token = 1, int(signals["top1"][1].argmax())
    entry, eps = placed.positions[token], 1e-2

    @torch.no_grad()
    def log_q() -> float:
        logits = study.stale_gap.cache_forward(engine.model, keys, values, fresh_ids, fresh_pos)[-1].double()
        return float(logits.log_softmax(-1)[greedy])

    squared = 0.0
    for cache in (keys, values):  # central differences along every coordinate of the token's K, then V
        for head in range(cache.shape[1]):
            for d in range(cache.shape[3]):
                original = float(cache[layer, head, entry, d])
                cache[layer, head, entry, d] = original + eps
                up = log_q()
                cache[layer, head, entry, d] = original - eps
                down = log_q()
                cache[layer, head, entry, d] = original
                squared += ((up - down) / (2 * eps)) ** 2
    assert squared == pytest.approx(float(signals["top1"][layer, token]), rel=0.05)


def test_picks_take_the_passage_heads_first_and_keep_the_budget(question, study):
    placed = question.placed
    values = torch.arange(placed.token_ids.numel(), dtype=torch.float64)  # later tokens rank higher
    heads = passage_heads(placed, 2)
    budget = heads.numel() + 5
    chosen = study.self_sensitivity.picks(placed, values, budget, sink=2)
    assert chosen.numel() == budget and torch.equal(chosen, chosen.sort().values)
    assert set(heads.tolist()) <= set(chosen.tolist()) and bool(placed.candidate[chosen].all())
    plain = study.self_sensitivity.picks(placed, values, 5)
    assert plain.tolist() == placed.candidate.nonzero()[-5:, 0].tolist()


def test_value_weighted_score_is_infoflows_with_unit_values_and_scales_with_a_keys_value_norm(study):
    torch.manual_seed(0)
    q, k = torch.randn(1, 6, 5, 8), torch.randn(1, 2, 12, 8)  # 3 query heads per K/V head, 9 scored keys
    mask = torch.zeros(1, 1, 5, 12)
    mask[:, :, :2, 10:] = float("-inf")  # the first rows do not see the last keys
    _, plain = study.selector_study._plain_grouped_attention(q, k, None, mask, 0.35, 9)
    ones = torch.ones(2, 9)
    assert torch.allclose(study.selector_study._value_weighted_scores(q, k, mask, 0.35, ones), plain, atol=1e-6)
    norms = ones.clone()
    norms[:, 3] = 2.5  # key 3's value is 2.5 times as long under both K/V heads
    weighted = study.selector_study._value_weighted_scores(q, k, mask, 0.35, norms)
    assert float(weighted[3]) == pytest.approx(2.5 * float(plain[3]), rel=1e-5)
    others = torch.arange(9) != 3
    assert torch.allclose(weighted[others], plain[others], atol=1e-6)


def test_value_weighted_sinkflow_takes_the_passage_heads_then_the_value_weighted_ranking(engine, question, study):
    placed, layers = question.placed, engine.score_layers
    probe = study.selector_study._study_probe(engine, placed, question.layout, "float32")
    budget = passage_heads(placed, 2).numel() + 5
    chosen = study.selector_study.ValueWeightedSinkFlow(sink=2, layers=layers).select(placed, budget, probe)
    assert chosen.numel() == budget and bool(placed.candidate[chosen].all())
    assert torch.equal(chosen, study.self_sensitivity.picks(placed, probe.value_scores(layers), budget, sink=2))
    assert not torch.equal(probe.value_scores(layers), probe.scores(layers))  # the weighting changes the ranking input


@pytest.mark.parametrize("part", ["title", "after"])
def test_title_heads_are_each_passages_title_through_its_colon_or_the_tokens_right_after_it(engine, study, part):
    titles = ["Rhine", "Marie Curie", "Canberra", "Basalt"]
    kvs = engine.prefill([f"{title}: {text}" for title, text in zip(titles, PASSAGES, strict=True)])
    placed = engine.prepare(QUESTION, kvs, selector="none").placed
    expected = []
    for (start, end), title in zip(recomputable_spans(placed), titles[1:], strict=True):  # the first is exact
        texts = [engine.tokenizer.decode([t]) for t in placed.token_ids[start:end].tolist()]
        colon = start + next(i for i, text in enumerate(texts) if ":" in text)
        assert engine.tokenizer.decode(placed.token_ids[start : colon + 1]).strip() == f"{title}:"
        expected += range(start, colon + 1) if part == "title" else range(colon + 1, colon + 3)
    values = torch.arange(placed.token_ids.numel(), dtype=torch.float64)  # the last token ranks first
    ranking = Probe(question_scores=lambda layers, heads: values, layer_kv=None)
    ranking.colon_ids = lambda: study.selector_study._colon_ids(engine)
    selector = study.selector_study.TitleSinkFlow(part=part, k=2, layers=[0])
    chosen = selector.select(placed, len(expected) + 1, ranking)
    last = int(placed.candidate.nonzero()[-1, 0])
    assert chosen.tolist() == sorted([*expected, last])


def test_title_heads_name_the_bad_part(study):
    with pytest.raises(ValueError, match="'title' or 'after', got 'titel'"):
        study.selector_study.TitleSinkFlow(part="titel")


def test_append_rows_writes_each_questions_rows_and_a_rerun_adds_only_what_is_missing(study, tmp_path):
    out = tmp_path / "rows" / "study.jsonl"  # the folder does not exist yet

    def run() -> None:  # as the study scripts do: skip the questions on file
        done = {row["id"] for row in study.selector_study._read(out)}

        def rows_for(ex):
            return [] if ex.id in done else [{"id": ex.id, "part": part} for part in (1, 2)]

        study.selector_study.append_rows(out, 0, 3, rows_for)

    run()
    first = out.read_text().splitlines()
    assert len(first) == 6 and len({json.loads(line)["id"] for line in first}) == 3
    out.write_text("\n".join(first[:2]) + "\n")  # as if cut short after the first question
    run()
    assert out.read_text().splitlines() == first


def test_auc_orders_positives_above_negatives(study):
    labels = np.array([0, 0, 1, 0, 1, 1])
    assert study.oracle_ranker.auc(np.arange(6.0), labels) == pytest.approx(8 / 9)
    assert study.oracle_ranker.auc(labels.astype(float) + np.arange(6) * 1e-3, labels) == 1.0
    assert study.oracle_ranker.auc(-labels.astype(float), labels) == 0.0
    rng = np.random.default_rng(0)
    assert study.oracle_ranker.auc(rng.random(4000), rng.integers(0, 2, 4000)) == pytest.approx(0.5, abs=0.03)


def test_layer_groups_tile_every_layer_after_the_first(study):
    for layers in (24, 30):
        groups = study.stale_gap.layer_groups(layers)
        assert len(groups) == study.stale_gap.LAYER_GROUPS and groups[0][0] == 1 and groups[-1][1] == layers - 1
        assert all(a[1] + 1 == b[0] for a, b in zip(groups, groups[1:], strict=False))


def test_the_one_backward_margin_pass_equals_the_collected_margin_signal(engine, question, study):
    collected = study.self_sensitivity.sensitivity(engine, question.placed, question.layout)["margin"][1:].sum(0).sqrt()
    one_pass = study.self_sensitivity.margin_sensitivity(engine, question.placed, question.layout)
    torch.testing.assert_close(one_pass.double(), collected, rtol=1e-5, atol=1e-9)


def test_head_shares_sum_the_first_k_tokens_of_every_span_and_stop_at_its_end(study):
    scores = torch.tensor([5.0, 1, 2, 3, 4, 1, 1, 6, 7, 1])  # total 31
    shares = study.sink_attention.head_shares(scores, [(2, 5), (7, 9)], heads=(1, 2, 8))
    assert shares == pytest.approx({1: (2 + 6) / 31, 2: (2 + 3 + 6 + 7) / 31, 8: (2 + 3 + 4 + 6 + 7) / 31})


def test_sink_measure_compares_the_stale_cache_with_full_prefills_on_every_layer_group(question, study):
    row = study.sink_attention.measure(question)
    spans = [(s, e) for _, s, e in question.stale_passages]
    shortest = min(e - s for s, e in spans)
    k = max(h for h in study.sink_attention.HEADS if h <= shortest)  # a flat share is then k tokens per passage
    assert row["flat"][k] == pytest.approx(k * len(spans) / question.placed.token_ids.numel())
    groups = study.sink_attention.layer_groups(question.engine)
    thirds = sorted(sum(list(groups.values())[1:], []))
    assert set(groups) <= set(row) and thirds == list(range(question.engine.num_layers))
    for name in groups:
        stale, full = row[name]["stale"], row[name]["full"]
        assert all(0 < stale[h] <= 1 and 0 < full[h] <= 1 for h in stale)
    # the cache is stale, so the shares move on at least one group of layers
    assert any(row[name]["stale"] != pytest.approx(row[name]["full"], rel=1e-3) for name in groups)


def test_the_affine_fit_recovers_a_known_map_and_measures_what_it_removes(study):
    cal = study.stale_calibration
    torch.manual_seed(0)
    x = torch.randn(3, 2, 500, 8, dtype=torch.float64)  # (L, kv_heads, S, d)
    a, b = torch.tensor([[0.9, 1.1]] * 3, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64)
    noise = 0.01 * torch.randn_like(x)
    y = a[:, :, None, None] * x + b[:, :, None, :] + noise
    stats = cal.sufficient_stats(x, y)
    fitted_a, fitted_b = cal.fit(stats)
    assert torch.allclose(fitted_a, a, atol=1e-3) and torch.allclose(fitted_b, b, atol=2e-3)
    left = float(noise.pow(2).sum() / (y - x).pow(2).sum())
    assert cal.explained(stats, fitted_a, fitted_b) == pytest.approx(1 - left, abs=1e-4)
    assert cal.explained(stats, torch.ones_like(a), torch.zeros_like(b)) == pytest.approx(0, abs=1e-12)


def test_question_stats_cover_every_stale_token_once_and_sum_the_stale_caches_deviation(engine, question, study):
    cal = study.stale_calibration
    stats = cal.question_stats(engine, QUESTION, PASSAGES)
    stale = question.positions[question.placed.candidate]
    for part, s_, f_ in (("k", question.stale_k, question.fresh_k), ("v", question.stale_v, question.fresh_v)):
        s = cal.pooled([stats], [(part, b) for b in range(len(cal.BUCKETS))])
        assert s["n"] == stale.numel()
        # RoPE is a rotation: the deviation summed in the pre-RoPE frame is the cache's own
        direct = (f_[:, :, stale].double() - s_[:, :, stale].double()).pow(2).sum()
        assert float((s["Syy"] - 2 * s["Sxy"] + s["Sxx"]).sum()) == pytest.approx(float(direct), rel=1e-6)
        assert float(direct) > 0


def test_collect_keeps_each_questions_stats_and_a_rerun_computes_only_the_missing(engine, study, tmp_path, monkeypatch):
    cal = study.stale_calibration
    examples = [EvalExample(f"t{i}", QUESTION, ["Canberra"], PASSAGES) for i in range(2)]
    path = tmp_path / "map.pt.stats"
    first = cal.collect(engine, examples[:1], path)
    assert path.exists() and list(torch.load(path)) == ["t0"]
    asked = []
    real = cal.question_stats
    monkeypatch.setattr(cal, "question_stats", lambda *args: asked.append(args[1]) or real(*args))
    both = cal.collect(engine, examples, path)
    assert asked == [QUESTION] and list(torch.load(path)) == ["t0", "t1"]  # t0 came from the file
    assert torch.equal(both[0][("k", 0)]["Sxy"], first[0][("k", 0)]["Sxy"])


def test_calibrate_stale_moves_only_the_stale_tokens_by_the_map(engine, study):
    placed = engine.prepare(QUESTION, engine.prefill(PASSAGES), selector="none").placed
    keys, values = placed.prompt_keys.clone(), placed.prompt_values.clone()  # (L, kv_heads, M, d)
    layers, kv_heads, _, d = keys.shape
    torch.manual_seed(1)
    b_k, b_v = torch.randn(layers, kv_heads, d), torch.randn(layers, kv_heads, d)
    fit = {"k": (torch.full((layers, kv_heads), 0.5), b_k), "v": (torch.full((layers, kv_heads), 2.0), b_v)}
    study.selector_study.calibrate_stale(placed, fit, engine.inv_freq)
    stale, exact = placed.positions[placed.candidate], placed.positions[~placed.candidate]
    assert stale.numel() and exact.numel()
    assert torch.equal(placed.prompt_keys[:, :, exact], keys[:, :, exact])
    assert torch.equal(placed.prompt_values[:, :, exact], values[:, :, exact])
    unrotated = rotate_keys(placed.prompt_keys[:, :, stale] - 0.5 * keys[:, :, stale], -stale, engine.inv_freq)
    assert torch.allclose(unrotated, b_k[:, :, None, :].expand_as(unrotated), atol=1e-5)  # R(p) b at position p
    assert torch.allclose(placed.prompt_values[:, :, stale], 2.0 * values[:, :, stale] + b_v[:, :, None, :], atol=1e-6)
    assert torch.equal(placed.keys, placed.prompt_keys[:, :, : placed.positions.numel()])  # the scoring views see it


def test_calibrated_selector_names_a_bad_option_and_a_missing_map(study, tmp_path):
    with pytest.raises(ValueError, match="got 'q'"):
        study.selector_study.CalibratedSelector(fit="x", parts="q")
    with pytest.raises(ValueError, match="got 'epic'"):
        study.selector_study.CalibratedSelector(fit="x", inner="epic")
    missing = str(tmp_path / "map.pt")
    with pytest.raises(FileNotFoundError, match="stale_calibration.py --fit-out"):
        study.selector_study._load_fit(missing)


def test_the_filler_cache_keeps_the_first_passage_and_places_the_rest_as_if_behind_the_lead_in(engine, study):
    lead = engine.replace(lead_in=study.selector_study.NEUTRAL_LEAD_IN)
    kvs = study.selector_study.first_exact(engine, lead, PASSAGES)
    plain = engine.prefill(PASSAGES)
    assert torch.equal(kvs[0].keys, plain[0].keys) and torch.equal(kvs[0].values, plain[0].values)
    shift = len(lead.passage_context) - len(engine.prefix)
    for kv, behind in zip(kvs[1:], lead.prefill(PASSAGES[1:]), strict=True):
        assert kv.offset == len(engine.prefix) and engine.kv_problem(kv, kv.token_ids.tolist()) is None
        assert torch.allclose(kv.keys, rotate_keys(behind.keys, torch.full((len(kv),), -shift), engine.inv_freq))
        assert torch.equal(kv.values, behind.values)
    # Placed by the plain engine, the moved keys are where the lead-in engine places its own: the same prompt keys.
    ours = engine.prepare(QUESTION, kvs, selector="none").placed
    theirs = lead.prepare(QUESTION, lead.prefill(PASSAGES), selector="none").placed
    first_end = ours.spans[0][2]
    assert torch.allclose(ours.keys[:, :, first_end:], theirs.keys[:, :, first_end:], atol=1e-5)


def test_paired_methods_pairs_two_methods_question_by_question(study):
    results = read_results(Path(__file__).parent.parent / "docs/score-dtype/smollm2-135m/results.jsonl").results
    first, second = "infoflow@0.15", 'infoflow;score_dtype="bfloat16"@0.15'
    one = [r for r in results if r.id == results[0].id]  # a question's results alone: every method once
    c = study.paired_methods.compare(one, first, second)
    by = {r.method: r for r in one}
    assert c["n"] == 1 and c["kl_answer"] == (by[first].kl_answer, by[second].kl_answer)
    assert c["difference"].mean == pytest.approx(by[second].kl_answer - by[first].kl_answer, abs=1e-15)
    same = [int(exact_match(by[m].prediction, by["full"].prediction)) for m in (first, second)]
    assert c["full_answer"] == tuple(same)
    whole = study.paired_methods.compare(results, first, second)
    assert whole["n"] == 60 and whole["difference"].low <= whole["difference"].mean <= whole["difference"].high
    full = {r.id: r.prediction for r in results if r.method == "full"}
    same_as_report = sum(exact_match(r.prediction, full[r.id]) for r in results if r.method == first)
    assert whole["full_answer"][0] == same_as_report  # normalised answers, as the report's "Same as full"
    assert sum(vars(whole["closer_tie_further"]).values()) == 60
    with pytest.raises(SystemExit, match="no results of 'infoflow@0.5' in the file"):
        study.paired_methods.compare(results, "infoflow@0.5", second)
    unmeasured = [dataclasses.replace(r, kl_answer=None) if r.method == first else r for r in one]
    with pytest.raises(SystemExit, match="no question has fidelity measures for both 'infoflow@0.15' and"):
        study.paired_methods.compare(unmeasured, first, second)
