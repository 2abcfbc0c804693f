"""The compiled sparse-query attention kernel against torch's masked SDPA, and the engine's fallback to the torch
path where it does not build."""

from pathlib import Path

import pytest
import torch
from conftest import PASSAGES, QUESTION

from infoflow_rag.engine import sparse_kernel
from infoflow_rag.engine.cache import position_mask


def _masked_sdpa(query, key, value, positions, scale):
    mask = position_mask(positions, torch.arange(key.shape[2]), query.dtype)  # (1, 1, Q, M)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    "heads, kv_heads, d, queries, keys",
    [
        (4, 4, 8, 12, 64),  # one row block, one key block
        (6, 2, 16, 50, 700),  # 150 folded rows: two row blocks; keys past one key block
        (14, 2, 64, 300, 1500),  # 2100 folded rows, three key blocks, Qwen2.5-0.5B's grouping
        (9, 3, 64, 1, 40),  # one query (a decode-sized recompute)
    ],
)
def test_kernel_equals_masked_sdpa(heads, kv_heads, d, queries, keys):
    torch.manual_seed(0)
    picks = torch.randperm(keys - 5)[: queries - 1].sort().values
    positions = torch.cat([picks, torch.tensor([keys - 1])])  # sorted picks, the last key's query at the end
    query = torch.randn(1, heads, queries, d) * 3  # large logits: the online softmax must rescale correctly
    key, value = torch.randn(2, 1, kv_heads, keys, d).unbind(0)
    out = sparse_kernel.sparse_attention(query, key, value, positions, 0.3)
    assert out is not None and out.shape == (1, queries, heads, d)
    # Against float64 attention, the kernel's float32 rounding stays within twice torch's own float32 SDPA's
    # (1.1e-5 on the largest case: logits up to ~30 over 1500 keys).
    exact = _masked_sdpa(query.double(), key.double(), value.double(), positions, 0.3)
    torch_error = (_masked_sdpa(query, key, value, positions, 0.3) - exact).abs().max()
    assert (out - exact).abs().max() <= max(2 * torch_error, 1e-6)


def test_kernel_leaves_what_it_cannot_take_to_the_torch_path():
    query, key, value = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    positions = torch.tensor([2, 5, 9])
    assert sparse_kernel.sparse_attention(query.double(), key.double(), value.double(), positions, 0.3) is None
    batch = (query.expand(2, -1, -1, -1), key.expand(2, -1, -1, -1), value.expand(2, -1, -1, -1))
    assert sparse_kernel.sparse_attention(*batch, positions, 0.3) is None


def test_kernel_refuses_limits_out_of_order():
    kernel = sparse_kernel.load()
    q, k = torch.randn(1, 3, 8), torch.randn(1, 10, 8)
    with pytest.raises(RuntimeError, match="limits must ascend within 1..10; row 2 has 4"):
        kernel.sparse_row_attention(q, k, k, torch.tensor([3, 5, 4]), 0.3)
    with pytest.raises(RuntimeError, match="row 2 has 11"):
        kernel.sparse_row_attention(q, k, k, torch.tensor([3, 5, 11]), 0.3)


def _recompute_logits(engine, selector):
    prep = engine.prepare(QUESTION, engine.prefill([p * 6 for p in PASSAGES]), selector=selector, ratio=0.4)
    return prep.out.logits


@pytest.mark.parametrize("selector", ["infoflow", "epic"])
def test_recompute_runs_the_kernel_and_the_torch_path_agrees(engine, monkeypatch, selector):
    from infoflow_rag.engine import attention

    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return sparse_kernel.sparse_attention(*args)

    monkeypatch.setattr(attention, "sparse_attention", spy)
    kernel = _recompute_logits(engine, selector)
    assert len(calls) == engine.num_layers  # every layer's recompute attention went to the kernel
    monkeypatch.setattr(attention, "sparse_attention", lambda *args: None)  # as where it did not build
    torch_path = _recompute_logits(engine, selector)
    assert (kernel - torch_path).abs().max() <= 1e-5


def test_a_kernel_that_does_not_build_warns_once_and_the_engine_falls_back(engine, monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++: not found")

    monkeypatch.setattr(sparse_kernel, "_loaded", [])
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="did not build .*g\\+\\+: not found.*Install g\\+\\+ and ninja"):
        assert sparse_kernel.load() is None
    assert sparse_kernel.load() is None  # decided once: no second build, no second warning
    kvs = engine.prefill(PASSAGES)
    prep = engine.prepare(QUESTION, kvs, selector="infoflow", ratio=1.0)
    _, reference = engine.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=1)
    assert (prep.out.logits - reference).abs().max() <= 1e-4


def test_the_ninja_wheel_is_found_without_an_activated_venv(monkeypatch, tmp_path):
    import shutil

    import ninja

    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja here, as under `.venv/bin/python` from make or CI
    sparse_kernel._put_ninja_on_path()
    assert shutil.which("ninja") == str(Path(ninja.BIN_DIR) / "ninja")
