"""Linear layers of a few rows on the compiled kernel (engine/few_rows.py) against float64 products, the torch path
where the kernel does not apply, and the engine's routing (decoding, the first token's logits) through it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import PASSAGES, compiled_calls_during

from infoflow_rag.engine import few_rows, kernels


@pytest.mark.parametrize(
    "shape, n_out, bias",
    [
        ((1, 37), 13, False),  # one row; K and N not multiples of 16 and 8 (the kernel's tails)
        ((1, 576), 1536, False),  # a SmolLM2 decoding step through gate_proj
        ((2, 896), 128, True),  # Qwen2.5-0.5B's k_proj shape, with its bias
        ((1, 3, 1536), 576, True),  # 3 rows (FEW_ROWS) in a 3-d input
    ],
)
def test_kernel_equals_a_float64_linear(shape, n_out, bias):
    torch.manual_seed(0)
    x, weight = torch.randn(*shape), torch.randn(n_out, shape[-1])
    b = torch.randn(n_out) if bias else None
    out = few_rows.few_row_linear(x, weight, b)
    assert out is not None and out.shape == (*shape[:-1], n_out)
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    # Within twice the error of torch's own float32 product (MKL's), against float64.
    torch_error = (F.linear(x, weight, b) - exact).abs().max()
    assert (out - exact).abs().max() <= max(2 * torch_error, 1e-6)


def test_what_the_kernel_cannot_take_goes_to_the_torch_path():
    x, weight = torch.randn(2, 16), torch.randn(8, 16)
    assert few_rows.few_row_linear(torch.randn(few_rows.FEW_ROWS + 1, 16), weight, None) is None
    assert few_rows.few_row_linear(x.double(), weight.double(), None) is None
    assert few_rows.few_row_linear(x.to("meta"), weight.to("meta"), None) is None
    assert few_rows.few_row_linear(torch.randn(0, 16), weight, None) is None
    with torch.enable_grad():  # the kernel has no backward
        assert few_rows.few_row_linear(x, weight.clone().requires_grad_(), None) is None
    assert few_rows.few_row_linear(x, weight, None) is not None


def test_kernel_refuses_bad_shapes():
    kernel = kernels.load()
    with pytest.raises(RuntimeError, match=r"takes x \(M, K\) and weight \(N, K\); got x \[3, 5\] and weight \[4, 6\]"):
        kernel.few_row_linear(torch.randn(3, 5), torch.randn(4, 6), None)
    with pytest.raises(RuntimeError, match=r"bias must be \(N,\) = \(4,\); got \[5\]"):
        kernel.few_row_linear(torch.randn(3, 6), torch.randn(4, 6), torch.randn(5))
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        kernel.few_row_linear(torch.randn(3, 6).to("meta"), torch.randn(4, 6), None)


def _few_rows(x, weight, bias) -> int | None:
    """The row count of a product the kernel is meant to take, else None."""
    rows = x.numel() // x.shape[-1]
    return rows if rows <= few_rows.FEW_ROWS else None


def test_decoding_runs_the_kernel_and_the_torch_path_agrees(family_engine, monkeypatch):
    engine, question = family_engine, "Where does the Rhine rise?"
    kvs = engine.prefill(PASSAGES)

    def answer():
        r = engine.answer(question, kvs, selector="infoflow", ratio=0.3, max_new_tokens=4)
        return r.answer_ids, engine.prepare(question, kvs, selector="infoflow", ratio=0.3)

    (ids, prep), rows = compiled_calls_during(monkeypatch, few_rows, "few_row_linear", answer, _few_rows)
    # single rows: the first token's logits and each decoded token (the question's rows are more than FEW_ROWS)
    assert rows and set(rows) == {1}
    monkeypatch.setattr(few_rows, "few_row_linear", lambda *args: None)  # as where the kernel did not build
    r = engine.answer(question, kvs, selector="infoflow", ratio=0.3, max_new_tokens=4)
    torch_prep = engine.prepare(question, kvs, selector="infoflow", ratio=0.3)
    assert torch.equal(prep.chosen, torch_prep.chosen)
    assert (prep.out.logits - torch_prep.out.logits).abs().max() <= 1e-4
    assert r.answer_ids == ids
