"""The bench's cost model against torch's own FLOP counter, and the ceiling it implies."""

import pytest
import torch
from conftest import without_attention_kernel, without_fast_linears
from tiny import tiny_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from infoflow_rag.costmodel import (
    Cost,
    ModelShape,
    full_prefill_flops,
    infoflow_scoring_flops,
    mean_relative_position,
    recompute_flops,
)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("cached", [0, 37, 150])
def test_one_token_after_a_cache_costs_what_torch_counts(family, cached):
    # Eager attention is plain matmuls, which the counter sees (the CPU SDPA kernel it does not); a single
    # query sees every key, so the counter's dense QK^T and PV are exactly the visible-key work.
    model = tiny_model(family).model
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 256, (1, cached + 1))
    cache = DynamicCache()
    with torch.inference_mode():
        if cached:
            model(input_ids=ids[:, :cached], cache=cache, use_cache=True, logits_to_keep=1)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids[:, cached:], cache=cache, use_cache=True, logits_to_keep=1)
    shape = ModelShape.of(model.config)
    assert recompute_flops(shape, torch.tensor([cached])) == counter.get_total_flops()


def test_full_prefill_linear_layers_cost_what_torch_counts(engine, monkeypatch):
    # The compiled attention kernel is invisible to the counter and the linear layers run F.linear, which it sees: the
    # count is the model's linear work, whose last layer runs q, k and v for every token, o and the MLP for the last.
    from infoflow_rag.engine.prefill import full_prefill

    without_fast_linears(monkeypatch)
    ids = engine.prompt_ids("Where does the Rhine rise?", ["The Rhine rises in the Swiss Alps."] * 3)
    with FlopCounterMode(display=False) as counter:
        full_prefill(engine.model, ids)
    shape, n = ModelShape.of(engine.model.config), len(ids)
    attention = ((shape.layers - 1) * n * (n + 1) // 2 + n) * shape.key_layer_flops
    assert counter.get_total_flops() == full_prefill_flops(shape, n) - attention


def test_recomputing_every_token_costs_a_full_prefill_and_late_tokens_cost_more():
    shape = ModelShape.of(tiny_model().model.config)
    n = 1000
    assert recompute_flops(shape, torch.arange(n)) == full_prefill_flops(shape, n)
    early, late = recompute_flops(shape, torch.arange(100)), recompute_flops(shape, torch.arange(n - 100, n))
    assert late > early
    cost = Cost(full_prefill_flops(shape, n), 0.0, late, mean_relative_position(torch.arange(n - 100, n), n))
    assert 1 < cost.ceiling < n / 100  # 10 % of the tokens, but the attention-heavy ones
    assert cost.mean_relative_position == pytest.approx((n - 50.5) / (n - 1))


def test_scoring_cost_grows_with_the_scoring_layers():
    shape = ModelShape.of(tiny_model().model.config)
    one, two = infoflow_scoring_flops(shape, 20, 500, [1]), infoflow_scoring_flops(shape, 20, 500, [1, 2])
    assert 0 < one < two < full_prefill_flops(shape, 520)


def test_infoflow_scoring_costs_what_torch_counts(engine, monkeypatch):
    # The question's attention is plain matmuls the counter sees (grouped_attention); they compute the dense
    # (q, K) scores, so the count exceeds the causal visible-key count by the question block's own upper
    # triangle: in the attention of layers 0..L-1 and in the last layer's QK^T.
    from infoflow_rag.engine.scoring import attention_scores

    # The counter sees torch's ops only: the question's few rows go through F.linear and the matmuls, not the
    # compiled kernels or oneDNN.
    without_fast_linears(monkeypatch)
    without_attention_kernel(monkeypatch)

    model, shape = engine.model, ModelShape.of(engine.model.config)
    n_context, n_queries, layers = 300, 12, [1, 2]
    kv = torch.randn(shape.layers, shape.kv_heads, n_context, shape.head_dim)
    query_ids = torch.randint(0, 256, (n_queries,))
    positions = n_context + torch.arange(n_queries)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        attention_scores(model, kv, kv, query_ids, positions, layers)
    triangle = n_queries * (n_queries - 1) // 2  # question-to-later-question scores, masked but computed
    dense_extra = triangle * (max(layers) * shape.key_layer_flops + shape.key_layer_flops // 2)
    expected = infoflow_scoring_flops(shape, n_queries, n_context, layers) + dense_extra
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-3)


def test_bench_reports_each_methods_ceiling_and_flop_rates(engine):
    from infoflow_rag.bench import bench_ttft, format_table

    methods = ("full", "infoflow", "infoflow+reorder", "cacheblend", "epic", "none")
    rows = {r.method: r for r in bench_ttft(engine, [1500], ratio=0.2, methods=methods, repeats=2)}
    assert rows["full prefill"].ceiling == 1.0 and rows["full prefill"].recompute_gflop_s > 0
    assert rows["full"].ceiling == 1.0  # one causal forward over the whole prompt, the prefix too
    # Scoring costs FLOPs: the reordered variant pays a second question pass on top of the same recompute.
    assert rows["infoflow+reorder"].ceiling < rows["infoflow"].ceiling < rows["none"].ceiling
    assert rows["epic"].score_gflop_s != rows["epic"].score_gflop_s  # nan: EPIC has no scoring pass
    assert rows["cacheblend"].score_gflop_s > 0 and rows["infoflow"].score_gflop_s > 0
    assert all(0 <= rows[m].mean_position <= 1 for m in ("infoflow", "cacheblend", "epic"))
    assert all(r.of_ceiling == r.speedup / r.ceiling for r in rows.values())
    assert all(len(r.times_s) == 2 and r.ttft_s == sum(r.times_s) / 2 for r in rows.values())  # their median
    # Each repeat's speedup pairs a method's time with full prefill's in the same repeat, never another repeat's;
    # the speedup of the medians lies within the repeats' own.
    reference = rows["full prefill"].times_s
    for r in rows.values():
        assert r.reference_s == reference
        assert r.repeat_speedups == [reference[0] / r.times_s[0], reference[1] / r.times_s[1]]
        assert min(r.repeat_speedups) <= r.speedup * (1 + 1e-12) and r.speedup <= max(r.repeat_speedups) * (1 + 1e-12)
    table = format_table(list(rows.values()))
    assert "| ceiling | of ceiling |" in table and "| – |" in table
    low, high = min(rows["epic"].repeat_speedups), max(rows["epic"].repeat_speedups)
    assert f"| {rows['epic'].speedup:.2f}x | {low:.2f}–{high:.2f}x |" in table


def test_bench_methods_read_the_eval_grammar_and_a_leadin_method_its_own_cache(engine, monkeypatch):
    from infoflow_rag.bench import bench_method, bench_ttft
    from infoflow_rag.engine.lead_in import NEUTRAL_LEAD_IN

    assert bench_method("sinkflow+leadin", 0.2).lead_in and bench_method("sinkflow+leadin", 0.2).options.ratio == 0.2
    assert bench_method("epic@0.1", 0.2).options.ratio == 0.1  # its own ratio wins over --ratio
    prefilled_behind = []
    prefill = type(engine).prefill

    def recording(self, texts, *args, **kwargs):
        prefilled_behind.append(self.lead_in)
        return prefill(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(engine), "prefill", recording)
    rows = {
        r.method: r for r in bench_ttft(engine, [600], ratio=0.2, methods=("sinkflow", "sinkflow+leadin"), repeats=1)
    }
    assert prefilled_behind == [None, NEUTRAL_LEAD_IN]  # one cache of each kind, each prefilled once
    assert rows["sinkflow+leadin"].recompute_fraction == pytest.approx(0.2, abs=0.02)
    assert bench_ttft(engine, [600], methods=("infoflow",), repeats=1) and prefilled_behind[2:] == [None]


def test_method_cost_counts_the_tokens_the_recompute_runs(engine):
    # The recompute runs the chosen cached tokens and the fresh prompt tokens, wherever they sit in the prompt.
    from infoflow_rag.bench import build_context, method_cost

    question, texts = build_context(engine, 1500)
    kvs = engine.prefill(texts)
    shape = ModelShape.of(engine.model.config)
    for selector in ("epic", "infoflow", "none"):
        prep = engine.prepare(question, kvs, selector=selector, ratio=0.2)
        n_prompt, placed = prep.out.next_position, prep.placed
        fresh = sorted(set(range(n_prompt)) - set(placed.positions.tolist()))
        inputs = torch.tensor(sorted(placed.positions[prep.chosen].tolist() + fresh))
        assert method_cost(engine, prep).recompute_flops == recompute_flops(shape, inputs), selector


def test_a_context_of_a_few_passages_reads_no_further_into_the_dataset(engine, monkeypatch):
    # bench store asks for its first passages: the dev set's later questions are held out, and reading them all
    # (tokenizing every paragraph) took half a minute
    from infoflow_rag.bench import build_context

    seen = []
    real = engine.passage_ids
    monkeypatch.setattr(engine, "passage_ids", lambda text: seen.append(text) or real(text))
    _, texts = build_context(engine, 10**9, n_passages=3)
    assert len(texts) == 3 and seen == texts


def test_every_bench_refuses_fewer_than_one_timed_run(engine, tmp_path):
    from infoflow_rag.bench import bench_prefill, bench_store, bench_ttft

    for run in (
        lambda: bench_ttft(engine, [1500], repeats=0),
        lambda: bench_prefill(engine, repeats=0),
        lambda: bench_store(engine, str(tmp_path), repeats=0),
    ):
        with pytest.raises(ValueError, match="repeats must be >= 1 .*got 0"):
            run()


def test_bench_ttft_refuses_a_context_past_the_window_before_any_prefill(engine, monkeypatch):
    # A context whose prompt leaves no room for the first token failed once every passage was prefilled (minutes
    # in, at 20K tokens on SmolLM2); it is refused first, with the most the model can take, which is accepted.
    from infoflow_rag.bench import bench_ttft, check_contexts

    window = engine.max_positions
    monkeypatch.setattr(type(engine), "prefill", lambda *a, **k: pytest.fail("prefilled before the refusal"))
    with pytest.raises(ValueError, match=rf"leaves no room .* {window}-token window; ask for at most \d+") as refused:
        bench_ttft(engine, [600, window + 100], methods=("infoflow",), repeats=1)
    most = int(refused.value.args[0].rsplit("at most ", 1)[1].split()[0])
    assert 0 < most < window
    check_contexts(engine, [most])  # the figure it names fits
    with pytest.raises(ValueError, match="no room"):
        check_contexts(engine, [most + 200])
