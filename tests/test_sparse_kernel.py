"""The compiled sparse-query attention kernel against torch's masked SDPA, and the engine's fallback to the torch
path where it does not build."""

import pytest
import torch
from conftest import PASSAGES, QUESTION, masked_sdpa_at, sparse_kernel_calls_during, without_attention_kernel

from infoflow_rag.engine import kernels, sparse_kernel


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
    exact = masked_sdpa_at(query.double(), key.double(), value.double(), positions, 0.3)
    torch_error = (masked_sdpa_at(query, key, value, positions, 0.3) - exact).abs().max()
    assert (out - exact).abs().max() <= max(2 * torch_error, 1e-6)


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (14, 2)])  # SmolLM2's and Qwen2.5-0.5B's grouping
def test_a_prefix_alone_gets_full_prefills_rows_bit_for_bit(heads, kv_heads):
    # The engine's correctness gate rests on it: the prefix's K/V, prefilled alone and cached, are what full prefill
    # computes for the same rows, so 100 % recompute over them reproduces full prefill exactly. A row's blocks and
    # products differ in the two (its block ends at the prefix, or runs on into the passages); its sum must not.
    torch.manual_seed(0)
    n, d = 1300, 64
    query = torch.randn(1, heads, n, d) * 3
    key, value = torch.randn(2, 1, kv_heads, n, d).unbind(0)
    full = sparse_kernel.sparse_attention(query, key, value, torch.arange(n), 0.125)
    for prefix in (5, 300, 517, 1030):  # within one block, past a product's alignment, past one and two key blocks
        head = (t[:, :, :prefix] for t in (query, key, value))
        alone = sparse_kernel.sparse_attention(*head, torch.arange(prefix), 0.125)
        assert torch.equal(alone, full[:, :prefix]), prefix


def test_kernel_reads_heads_inside_a_buffer_with_room():
    # The recompute's K/V heads are views into the placed buffers, which keep room for the answer after each head.
    torch.manual_seed(0)
    query, buffer = torch.randn(1, 6, 20, 16), torch.randn(2, 1, 2, 300 + 37, 16)
    key, value = buffer[0, :, :, :300], buffer[1, :, :, :300]
    positions = torch.randperm(300)[:20].sort().values
    out = sparse_kernel.sparse_attention(query, key, value, positions, 0.3)
    assert torch.equal(out, sparse_kernel.sparse_attention(query, key.contiguous(), value.contiguous(), positions, 0.3))


def test_kernel_leaves_what_it_cannot_take_to_the_torch_path():
    query, key, value = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    positions = torch.tensor([2, 5, 9])
    assert sparse_kernel.sparse_attention(query.double(), key.double(), value.double(), positions, 0.3) is None
    batch = (query.expand(2, -1, -1, -1), key.expand(2, -1, -1, -1), value.expand(2, -1, -1, -1))
    assert sparse_kernel.sparse_attention(*batch, positions, 0.3) is None
    elsewhere = (t.to("meta") for t in (query, key, value))  # not on the CPU (a GPU's tensors, say)
    assert sparse_kernel.sparse_attention(*elsewhere, positions, 0.3) is None
    with torch.enable_grad():  # the kernel has no backward: a forward that records gradients keeps torch's
        grad_query = query.clone().requires_grad_()
        assert sparse_kernel.sparse_attention(grad_query, key, value, positions, 0.3) is None
    assert sparse_kernel.sparse_attention(query, key, value, positions, 0.3) is not None


def test_kernel_takes_no_rows():
    k = torch.randn(2, 10, 8)
    out = kernels.load().sparse_row_attention(torch.randn(2, 0, 8), k, k, torch.empty(0, dtype=torch.long), 0.3)
    assert out.shape == (2, 0, 8)


def test_kernel_refuses_bad_limits_and_tensors_naming_them():
    kernel = kernels.load()
    q, k = torch.randn(1, 3, 8), torch.randn(1, 10, 8)
    with pytest.raises(RuntimeError, match="limits must ascend within 1..10; row 2 has 4"):
        kernel.sparse_row_attention(q, k, k, torch.tensor([3, 5, 4]), 0.3)
    with pytest.raises(RuntimeError, match="row 2 has 11"):
        kernel.sparse_row_attention(q, k, k, torch.tensor([3, 5, 11]), 0.3)
    with pytest.raises(RuntimeError, match=r"limits must be int64 \(R,\) = \(3,\) on the CPU; got Long \[2\]"):
        kernel.sparse_row_attention(q, k, k, torch.tensor([3, 5]), 0.3)
    with pytest.raises(RuntimeError, match="takes float32 tensors; got Double"):
        kernel.sparse_row_attention(q.double(), k, k, torch.tensor([3, 5, 9]), 0.3)
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        kernel.sparse_row_attention(q.to("meta"), k, k, torch.tensor([3, 5, 9]), 0.3)


def _recompute_logits(engine, selector):
    prep = engine.prepare(QUESTION, engine.prefill([p * 6 for p in PASSAGES]), selector=selector, ratio=0.4)
    return prep.out.logits


@pytest.mark.parametrize("selector", ["infoflow", "epic"])
def test_recompute_runs_the_kernel_and_the_torch_path_agrees(engine, monkeypatch, selector):
    kernel, calls = sparse_kernel_calls_during(monkeypatch, lambda: _recompute_logits(engine, selector))
    assert len(calls) == engine.num_layers  # every layer's recompute attention went to the kernel
    without_attention_kernel(monkeypatch)
    torch_path = _recompute_logits(engine, selector)
    assert (kernel - torch_path).abs().max() <= 1e-5
