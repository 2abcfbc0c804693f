"""The compiled decoding-step attention kernel (engine/decode_kernel.py) against float64 attention, the torch path
where it does not apply, and decoding through it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import PASSAGES, QUESTION, compiled_calls_during

from infoflow_rag.engine import attention, decode_kernel, kernels


def _sdpa(query, key, value, scale):
    return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize(
    "heads, kv_heads, d, keys",
    [
        (4, 4, 8, 1),  # one key: the softmax is 1
        (9, 3, 64, 256),  # SmolLM2's grouping, exactly one chunk of keys
        (9, 3, 64, 4130),  # 17 chunks, the last one short
        (14, 2, 64, 257),  # Qwen2.5-0.5B's grouping, one key past a chunk
    ],
)
def test_kernel_equals_float64_attention_over_a_cache_with_room(heads, kv_heads, d, keys):
    torch.manual_seed(0)
    query = torch.randn(1, heads, 1, d) * 3  # large logits: the chunks' maxima differ and must be merged right
    buffer = torch.randn(2, 1, kv_heads, keys + 40, d)  # K/V heads as views into a buffer with room, as decoding has
    key, value = buffer[0, :, :, :keys], buffer[1, :, :, :keys]
    out = decode_kernel.decode_attention(query, key, value, 0.3)
    assert out is not None and out.shape == (1, 1, heads, d)
    exact = _sdpa(query.double(), key.double(), value.double(), 0.3)
    # Within twice the error of torch's own float32 SDPA against float64.
    torch_error = (_sdpa(query, key, value, 0.3) - exact).abs().max()
    assert (out - exact).abs().max() <= max(2 * torch_error, 1e-6)


def test_what_the_kernel_cannot_take_goes_to_the_torch_path():
    query, key, value = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    take = decode_kernel.decode_attention
    assert take(query.double(), key.double(), value.double(), 0.3) is None
    assert take(query.expand(2, -1, -1, -1), key.expand(2, -1, -1, -1), value.expand(2, -1, -1, -1), 0.3) is None
    assert take(torch.randn(1, 4, 2, 8), key, value, 0.3) is None  # two rows per head: not a decoding step
    assert take(query, key[:, :, :0], value[:, :, :0], 0.3) is None  # no keys: left to SDPA (the kernel refuses M = 0)
    strided = torch.randn(1, 2, 10, 16)[..., ::2]  # K rows not contiguous
    assert take(query, strided, value, 0.3) is None and take(query, key, strided, 0.3) is None
    assert take(*(t.to("meta") for t in (query, key, value)), 0.3) is None  # not on the CPU
    with torch.enable_grad():  # the kernel has no backward
        assert take(query.clone().requires_grad_(), key, value, 0.3) is None
    assert take(query, key, value, 0.3) is not None


def test_kernel_refuses_bad_shapes_naming_them():
    kernel = kernels.load()
    q, k = torch.randn(2, 3, 8), torch.randn(2, 10, 8)
    wrong_d = r"q \(H, G, d\) and k, v \(H, M, d\) with M > 0; got q \[2, 3, 8\], k \[2, 10, 4\]"
    with pytest.raises(RuntimeError, match=wrong_d):
        kernel.decode_attention(q, k[..., :4].contiguous(), k[..., :4].contiguous(), 0.3)
    with pytest.raises(RuntimeError, match=r"rows contiguous .*got k \[80, 1, 10\]"):
        kernel.decode_attention(q, k.transpose(1, 2).contiguous().transpose(1, 2), k, 0.3)
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        kernel.decode_attention(q.to("meta"), k, k, 0.3)


def _greedy(engine, selector):
    return engine.answer(QUESTION, [p * 4 for p in PASSAGES], selector=selector, ratio=0.3, max_new_tokens=8)


def _decoding_step(query, key, value, scale) -> int | None:
    """The key count of a call the kernel is meant to take (one row per head), else None."""
    return key.shape[2] if query.shape[2] == 1 else None


@pytest.mark.parametrize("selector", ["infoflow", "full"])
def test_decoding_runs_the_kernel_and_the_torch_path_agrees(engine, monkeypatch, selector):
    got, calls = compiled_calls_during(
        monkeypatch, attention, "decode_attention", lambda: _greedy(engine, selector), _decoding_step
    )
    steps = got.generated_tokens - 1  # the first token comes from the prompt's forward
    assert steps > 0 and len(calls) == steps * engine.num_layers  # every layer of every step took the kernel
    monkeypatch.setattr(attention, "decode_attention", lambda *args: None)  # as where the kernel did not build
    assert _greedy(engine, selector).answer_ids == got.answer_ids
