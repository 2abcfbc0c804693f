"""The compiled sparse-query attention kernel against torch's masked SDPA, and the engine's fallback to the torch
path where it does not build."""

import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import PASSAGES, QUESTION, kernel_calls_during, without_kernel

from infoflow_rag.engine import sparse_kernel
from infoflow_rag.engine.attention import masked_sdpa
from infoflow_rag.engine.cache import position_mask


def _masked_sdpa(query, key, value, positions, scale):
    mask = position_mask(positions, torch.arange(key.shape[2]), query.dtype)  # (1, 1, Q, M)
    return masked_sdpa(query, key, value, mask, scale)


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
    elsewhere = (t.to("meta") for t in (query, key, value))  # not on the CPU (a GPU's tensors, say)
    assert sparse_kernel.sparse_attention(*elsewhere, positions, 0.3) is None
    with torch.enable_grad():  # the kernel has no backward: a forward that records gradients keeps torch's
        grad_query = query.clone().requires_grad_()
        assert sparse_kernel.sparse_attention(grad_query, key, value, positions, 0.3) is None
    assert sparse_kernel.sparse_attention(query, key, value, positions, 0.3) is not None


def test_kernel_refuses_limits_out_of_order():
    kernel = sparse_kernel.load()
    q, k = torch.randn(1, 3, 8), torch.randn(1, 10, 8)
    with pytest.raises(RuntimeError, match="limits must ascend within 1..10; row 2 has 4"):
        kernel.sparse_row_attention(q, k, k, torch.tensor([3, 5, 4]), 0.3)
    with pytest.raises(RuntimeError, match="row 2 has 11"):
        kernel.sparse_row_attention(q, k, k, torch.tensor([3, 5, 11]), 0.3)
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        kernel.sparse_row_attention(q.to("meta"), k, k, torch.tensor([3, 5, 9]), 0.3)


def _recompute_logits(engine, selector):
    prep = engine.prepare(QUESTION, engine.prefill([p * 6 for p in PASSAGES]), selector=selector, ratio=0.4)
    return prep.out.logits


@pytest.mark.parametrize("selector", ["infoflow", "epic"])
def test_recompute_runs_the_kernel_and_the_torch_path_agrees(engine, monkeypatch, selector):
    kernel, calls = kernel_calls_during(monkeypatch, lambda: _recompute_logits(engine, selector))
    assert len(calls) == engine.num_layers  # every layer's recompute attention went to the kernel
    without_kernel(monkeypatch)
    torch_path = _recompute_logits(engine, selector)
    assert (kernel - torch_path).abs().max() <= 1e-5


def test_a_kernel_that_does_not_build_warns_once_and_the_engine_falls_back(engine, monkeypatch):
    from torch.utils import cpp_extension

    builds = []

    def no_compiler(*args, **kwargs):
        builds.append(kwargs["name"])
        raise RuntimeError("Error building extension: g++: not found")

    monkeypatch.setattr(sparse_kernel, "_loaded", [])
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="did not build .*g\\+\\+: not found.*Install g\\+\\+ and ninja"):
        assert sparse_kernel.load() is None
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert sparse_kernel.load() is None
    assert len(builds) == 1 and not again  # decided once: no second build, no second warning
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


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(monkeypatch, tmp_path):
    # torch's loader waits without end while a build's lock file exists; one left by a build killed long ago
    # must not hang every later process.
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    locks_seen = []

    def fake_build(*, name, build_directory, **kwargs):
        locks_seen.append((Path(build_directory) / "lock").exists())
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_build)
    name = f"infoflow_sparse_attention_{sparse_kernel._cpu_tag()}"
    lock = sparse_kernel._build_directory(str(tmp_path), name) / "lock"
    lock.touch()
    old = time.time() - sparse_kernel.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    monkeypatch.setattr(sparse_kernel, "_loaded", [])
    with pytest.warns(RuntimeWarning, match="removed .*lock, left .* by a kernel build that did not finish"):
        assert sparse_kernel.load() == "module"
    lock.touch()  # a build in progress: left for torch to wait on
    monkeypatch.setattr(sparse_kernel, "_loaded", [])
    assert sparse_kernel.load() == "module"
    assert locks_seen == [False, True]
    assert lock.parent.parent.name.endswith(f"_torch{torch.__version__}")  # one build per torch version
