"""Every linear layer of the engine's model (engine/linears.py): more than a few rows on oneDNN's product over packed
weights, equal to a float64 product within MKL's own error, a row's product independent of the rows beside it
(what keeps 100 % recompute equal to full prefill bit for bit), the weights repacked when they change, F.linear
where oneDNN does not apply, and prefills kept off the few-row kernel."""

import pytest
import torch
import torch.nn.functional as F
from conftest import PASSAGES
from torch import nn

from infoflow_rag.engine import few_rows, linears
from infoflow_rag.engine.prefill import full_prefill

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def packed_layer(n_in: int, n_out: int, bias: bool) -> linears.EngineLinear:
    layer = nn.Linear(n_in, n_out, bias=bias)
    linears.install(layer)
    assert type(layer) is linears.EngineLinear and layer.packed is not None
    return layer


@pytest.mark.parametrize(
    "n_in, n_out, bias", [(576, 1536, False), (1536, 576, False), (896, 128, True), (37, 13, True)]
)
def test_packed_product_equals_a_float64_linear_and_a_row_does_not_depend_on_its_batch(n_in, n_out, bias):
    torch.manual_seed(0)
    layer = packed_layer(n_in, n_out, bias)
    x = torch.randn(300, n_in)
    with torch.inference_mode():
        out = layer(x)
        exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
        mkl_error = (F.linear(x, layer.weight, layer.bias) - exact).abs().max()
        # Rounding of the same order as MKL's float32 product (its largest error over 300 rows is within 4x MKL's).
        assert (out - exact).abs().max() <= max(4 * mkl_error, 1e-6)
        # From 2 rows up (1 row takes the kernel), a row's product is the same bits however many rows run with it
        # and wherever it sits: a passage prefilled alone gets the K/V full prefill computes for its tokens.
        with linears.batched_linears():
            for rows in (2, 7, few_rows.FEW_ROWS + 1, 64, 65, 299):
                assert torch.equal(layer(x[:rows]), out[:rows])
                assert torch.equal(layer(x[1 : rows + 1][None])[0], out[1 : rows + 1])  # a 3-d input, offset rows


def test_install_keeps_parameters_and_ties_and_packs_all_but_the_output_embedding(engine):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 16, bias=False))
    model[2].weight = nn.Parameter(model[0].weight.t().contiguous())
    params = {name: p for name, p in model.named_parameters()}
    x = torch.randn(3, 16)
    before = model(x)
    linears.install(model)
    linears.install(model)  # a second engine on the same model: nothing changes
    assert [type(m) for m in model] == [linears.EngineLinear, nn.ReLU, linears.EngineLinear]
    assert {name: p for name, p in model.named_parameters()} == params  # the same tensors, not copies
    with torch.inference_mode():
        assert (model(x) - before).abs().max() <= 1e-5
    layers = [m for m in engine.model.modules() if isinstance(m, nn.Linear)]
    output = engine.model.get_output_embeddings()
    assert all(type(m) is linears.EngineLinear for m in layers)
    assert output.packed is None and all(m.packed is not None for m in layers if m is not output)


def test_a_weight_changed_or_replaced_is_repacked():
    torch.manual_seed(0)
    layer = packed_layer(32, 48, True)
    x = torch.randn(40, 32)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: same storage, new version
    with torch.inference_mode():
        assert (layer(x) - F.linear(x, layer.weight, layer.bias)).abs().max() <= 1e-5
    layer.weight = nn.Parameter(torch.randn(48, 32))  # replaced
    with torch.inference_mode():
        assert (layer(x) - F.linear(x, layer.weight, layer.bias)).abs().max() <= 1e-5


def test_what_onednn_cannot_take_runs_f_linear(monkeypatch):
    torch.manual_seed(0)
    layer = packed_layer(32, 48, True)
    x = torch.randn(40, 32)
    with torch.enable_grad():  # gradients recorded: oneDNN's product has no backward here
        out = layer(x.requires_grad_())
        out.square().sum().backward()
        want = x.detach().clone().requires_grad_()
        F.linear(want, layer.weight, layer.bias).square().sum().backward()
        assert torch.equal(x.grad, want.grad)
    layer64 = layer.double()
    with torch.inference_mode():
        assert torch.equal(layer64(x.double()), F.linear(x.double(), layer64.weight, layer64.bias))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a torch built without it
    bare = nn.Linear(32, 48)
    linears.install(bare)
    assert bare.packed is None
    with torch.inference_mode():
        assert torch.equal(bare(x.detach()), F.linear(x.detach(), bare.weight, bare.bias))


def test_full_prefill_and_the_recompute_run_the_packed_product(engine, monkeypatch):
    rows, packed_for = [], linears.EngineLinear._packed_for

    def spy(self, x):
        packed = packed_for(self, x)
        if packed is not None:
            rows.append(x.numel() // x.shape[-1])
        return packed

    monkeypatch.setattr(linears.EngineLinear, "_packed_for", spy)
    question = "Where does the Rhine rise?"
    ids = engine.prompt_ids(question, PASSAGES)
    full_prefill(engine.model, ids)
    n_linears = sum(type(m) is linears.EngineLinear and m.packed is not None for m in engine.model.modules())
    # The last layer's o_proj and MLP run its last row alone (engine/last_layer.py), on the kernel.
    last = engine.model.get_decoder().layers[-1]
    n_last_row = 1 + sum(type(m) is linears.EngineLinear for m in last.mlp.modules())
    assert rows == [len(ids)] * (n_linears - n_last_row)
    # The recompute's inputs (the chosen cached tokens and the fresh ones) through every packed layer.
    kvs = engine.prefill(PASSAGES)
    rows.clear()
    prep = engine.prepare(question, kvs, selector="infoflow", ratio=0.5)
    n_inputs = prep.chosen.numel() + prep.out.next_position - prep.placed.token_ids.numel()
    assert rows.count(n_inputs) == n_linears - n_last_row


def test_prefills_run_batched_linears(engine, monkeypatch):
    # A passage or prompt head prefilled on the kernel would differ from full prefill's K/V at float rounding
    # (the real-model tier checks the bit-for-bit result); a short passage alone is a few rows.
    kernel_rows, kernel = [], few_rows.few_row_linear

    def spy(x, weight, bias):
        out = kernel(x, weight, bias)
        if out is not None:
            kernel_rows.append(x.numel() // x.shape[-1])
        return out

    monkeypatch.setattr(few_rows, "few_row_linear", spy)
    monkeypatch.setattr(few_rows, "FEW_ROWS", 64)  # a short passage and the prompt head are then "a few rows"
    kv = engine.prefill(["Short."])[0]
    head = engine.replace()  # prefills its prompt head again
    assert len(kv) <= few_rows.FEW_ROWS and len(head.prefix) <= few_rows.FEW_ROWS and kernel_rows == []
    engine.answer("Why?", [kv], max_new_tokens=2)
    assert kernel_rows  # outside prefills, the same few rows take the kernel


needs_bfloat16 = pytest.mark.skipif(not linears.bfloat16_products(), reason="this CPU has no bfloat16 products")


@needs_bfloat16
@pytest.mark.parametrize("n_in, n_out", [(576, 1536), (896, 128), (37, 13)])
def test_bfloat16_products_round_inputs_and_outputs_and_add_the_bias_in_float32(n_in, n_out):
    torch.manual_seed(0)
    layer, bare = packed_layer(n_in, n_out, True), packed_layer(n_in, n_out, False)
    with torch.no_grad():
        bare.weight.copy_(layer.weight)
    bare.pack()
    x = torch.randn(40, n_in)
    with torch.inference_mode():
        single = layer(x)
        with linears.products_in("bfloat16"):
            half, half_bare = layer(x), bare(x)
        with linears.products_in("float32"):
            assert torch.equal(layer(x), single)  # the float32 weights, as outside
    exact = F.linear(x.bfloat16().double(), layer.weight.bfloat16().double())  # bfloat16 operands, summed exactly
    assert torch.equal(half_bare, half_bare.bfloat16().float())  # the product comes out in bfloat16
    assert (half_bare - exact).abs().max() <= 2**-8 * exact.abs().max()  # one bfloat16 rounding of the sum
    assert torch.equal(half, half_bare + layer.bias)  # the bias added after, in float32
    assert (half - single).abs().max() > 0  # not the float32 product


@needs_bfloat16
def test_bfloat16_products_leave_a_few_rows_on_the_float32_kernel_and_follow_a_changed_weight():
    torch.manual_seed(0)
    layer = packed_layer(64, 96, False)
    x = torch.randn(40, 64)
    with torch.inference_mode():
        few = layer(x[: few_rows.FEW_ROWS])
        with linears.products_in("bfloat16"):
            assert torch.equal(layer(x[: few_rows.FEW_ROWS]), few)
    with torch.no_grad():
        layer.weight.mul_(-2)  # in place: both copies are packed again
    with torch.inference_mode(), linears.products_in("bfloat16"):
        changed = layer(x)
    exact = F.linear(x.double(), layer.weight.double())
    assert (changed - exact).abs().max() <= 2**-6 * exact.abs().max()  # bfloat16 operands: ~2^-8 each


def test_without_bfloat16_products_a_layer_keeps_no_copy_and_runs_float32(monkeypatch):
    monkeypatch.setattr(linears, "bfloat16_products", lambda: False)  # a CPU without AVX-512 BF16 or AMX
    torch.manual_seed(0)
    layer = packed_layer(64, 96, True)
    assert layer.packed_bfloat16 is None
    x = torch.randn(40, 64)
    with torch.inference_mode():
        single = layer(x)
        with linears.products_in("bfloat16"):
            assert torch.equal(layer(x), single)


@needs_bfloat16
def test_score_dtype_reaches_the_scoring_passes_and_nothing_else(engine, monkeypatch):
    seen, forward = [], linears.EngineLinear.forward

    def spy(self, x):
        seen.append((x.numel() // x.shape[-1], linears._product_dtype.get()))
        return forward(self, x)

    monkeypatch.setattr(linears.EngineLinear, "forward", spy)
    kvs = engine.prefill(PASSAGES)
    question = "Where does the Rhine rise?"
    counts = {}
    for dtype, reorder in [("float32", False), ("bfloat16", False), ("bfloat16", True)]:
        seen.clear()
        prep = engine.prepare(question, kvs, selector="infoflow", ratio=0.5, reorder=reorder, score_dtype=dtype)
        n_question = prep.layout.query_ids.numel()
        half = [rows for rows, d in seen if d is torch.bfloat16]
        assert set(half) == (set() if dtype == "float32" else {n_question})  # the question's rows: scoring passes
        assert any(rows > n_question for rows, d in seen if d is torch.float32)  # the recompute in float32
        counts[dtype, reorder] = len(half)
    # The reorder stage's scoring round runs in the same weights: one scoring pass more.
    assert counts["bfloat16", True] == 2 * counts["bfloat16", False] > 0
