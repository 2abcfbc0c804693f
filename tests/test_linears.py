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
