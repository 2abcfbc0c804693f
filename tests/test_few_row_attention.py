"""The compiled attention kernel for a few rows (engine/few_row_attention.py): a decoding step's rows and a question's
rows in a scoring pass, against float64 attention; the torch path where it does not apply; decoding and scoring
through it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import PASSAGES, QUESTION, compiled_calls_during

from infoflow_rag.engine import attention, few_row_attention, kernels, scoring

MIN = torch.finfo(torch.float32).min


def _sdpa(query, key, value, scale, mask=None):
    return F.scaled_dot_product_attention(query, key, value, mask, scale=scale, enable_gqa=True).transpose(1, 2)


def _probabilities(query, key, scale, mask):
    """softmax(QK^T * scale + mask) per query head: (heads, q, M)."""
    group = query.shape[1] // key.shape[1]
    logits = query @ key.repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    return (logits if mask is None else logits + mask).softmax(-1)[0]


def _within_torch_error(got, query, key, value, scale, mask=None):
    """got is as close to float64 attention as twice torch's own float32 SDPA is (or 1e-6)."""
    exact = _sdpa(query.double(), key.double(), value.double(), scale, None if mask is None else mask.double())
    torch_error = (_sdpa(query, key, value, scale, mask) - exact).abs().max()
    return (got - exact).abs().max() <= max(2 * torch_error, 1e-6)


@pytest.mark.parametrize(
    "heads, kv_heads, d, keys",
    [
        (4, 4, 8, 1),  # one key: the softmax is 1
        (9, 3, 64, 256),  # SmolLM2's grouping, exactly one chunk of keys
        (9, 3, 64, 4130),  # 17 chunks, the last one short
        (14, 2, 64, 257),  # Qwen2.5-0.5B's grouping, one key past a chunk
    ],
)
def test_decoding_step_equals_float64_attention_over_a_cache_with_room(heads, kv_heads, d, keys):
    torch.manual_seed(0)
    query = torch.randn(1, heads, 1, d) * 3  # large logits: the chunks' maxima differ and must be merged right
    buffer = torch.randn(2, 1, kv_heads, keys + 40, d)  # K/V heads as views into a buffer with room, as decoding has
    key, value = buffer[0, :, :, :keys], buffer[1, :, :, :keys]
    out = few_row_attention.decode_attention(query, key, value, 0.3)
    assert out is not None and out.shape == (1, 1, heads, d)
    assert _within_torch_error(out, query, key, value, 0.3)


def _scoring_mask(rows: int, keys: int, context: int) -> torch.Tensor:
    """A scoring pass's mask (1, 1, rows, keys): the context seen by every row, the slots after it unfilled but the
    question's last ``rows``, seen causally."""
    k_pos = torch.full((keys,), keys)
    k_pos[:context] = -1
    q_pos = torch.arange(keys - rows, keys)
    k_pos[q_pos] = q_pos
    return torch.zeros(rows, keys).masked_fill_(k_pos[None, :] > q_pos[:, None], MIN)[None, None]


@pytest.mark.parametrize(
    "heads, kv_heads, rows, keys",
    [
        (4, 2, 3, 40),  # 6 rows per K/V head: dot products per key
        (9, 3, 13, 4130),  # SmolLM2's 39 rows per K/V head over 17 chunks, the last one short: the products' path
        (14, 2, 13, 600),  # Qwen2.5-0.5B's 91
    ],
)
def test_question_rows_equal_float64_attention_and_their_probabilities(heads, kv_heads, rows, keys):
    torch.manual_seed(0)
    d, context = 64, keys - rows - 5  # five unfilled slots between the context and the question
    query = torch.randn(1, heads, rows, d) * 3
    key, value = torch.randn(1, kv_heads, keys, d), torch.randn(1, kv_heads, keys, d)
    mask = _scoring_mask(rows, keys, context)
    got = few_row_attention.few_row_attention(query, key, value, mask, 0.3, context)
    assert got is not None
    out, probs = got
    assert out.shape == (1, rows, heads, d) and probs.shape == (kv_heads, heads // kv_heads, rows, context)
    assert _within_torch_error(out, query, key, value, 0.3, mask)
    exact = _probabilities(query.double(), key.double(), 0.3, mask.double())[..., :context]
    torch_error = (_probabilities(query, key, 0.3, mask)[..., :context] - exact).abs().max()
    assert (probs.reshape(heads, rows, context) - exact).abs().max() <= max(2 * torch_error, 1e-7)
    # Without values: the same probabilities, no output.
    alone = few_row_attention.few_row_attention(query, key, None, mask, 0.3, context)
    assert alone is not None and alone[0] is None and torch.equal(alone[1], probs)


@pytest.mark.parametrize("heads", [2, 9])  # 4-6 rows per K/V head: dot products; 18-27: the products
def test_the_mask_adds_and_masked_keys_weigh_nothing_even_a_whole_chunk_of_them(heads):
    torch.manual_seed(0)
    query, key, value = torch.randn(1, heads, 3, 16), torch.randn(1, 1, 600, 16), torch.randn(1, 1, 600, 16)
    mask = torch.randn(1, 1, 3, 600)  # any additive mask, not only 0 and the lowest float
    mask[0, 0, 0, 256:512] = MIN  # row 0 sees nothing of the second chunk
    mask[0, 0, 1, 1::2] = MIN  # row 1 every other key
    out, probs = few_row_attention.few_row_attention(query[:, :, :2], key, value, mask[:, :, :2], 0.5, 600)
    seen = (mask[0, 0, :2] != MIN).repeat(heads, 1)  # (heads * rows, keys): folded rows, head-major
    assert (probs.reshape(2 * heads, 600)[~seen] == 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(1, heads, 2))
    assert _within_torch_error(out, query[:, :, :2], key, value, 0.5, mask[:, :, :2])
    # A row that sees no key at all gets a zero output and zero probabilities, not NaN.
    mask[0, 0, 2] = MIN
    out, probs = few_row_attention.few_row_attention(query, key, value, mask, 0.5, 600)
    assert (out[0, 2] == 0).all() and (probs[:, :, 2] == 0).all() and out.isfinite().all()


def test_what_the_kernel_cannot_take_goes_to_the_torch_path():
    query, key, value = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    take = few_row_attention.decode_attention
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

    rows, mask = torch.randn(1, 4, 3, 8), torch.zeros(1, 1, 3, 10)
    question = few_row_attention.few_row_attention
    assert question(rows, key, value, mask, 0.3, 10) is not None
    assert question(rows, key, value, mask.expand(2, 1, 3, 10), 0.3, 10) is None  # a mask per prompt of a batch
    assert question(rows, key, value, mask[..., :9], 0.3, 9) is None  # not one mask entry per key
    assert question(rows, key, value, torch.zeros(1, 1, 3, 20)[..., ::2], 0.3, 10) is None  # mask rows strided
    assert question(rows, key, value, mask.double(), 0.3, 10) is None
    assert question(rows, strided, None, mask, 0.3, 10) is None
    assert question(rows, key[:, :, :0], value[:, :, :0], mask[..., :0], 0.3, 0) is None


def test_kernel_refuses_bad_shapes_naming_them():
    kernel = kernels.load()
    q, k = torch.randn(2, 3, 8), torch.randn(2, 10, 8)
    wrong_d = r"q \(H, G, d\) and k, v \(H, M, d\) with M > 0; got q \[2, 3, 8\], k \[2, 10, 4\]"
    with pytest.raises(RuntimeError, match=wrong_d):
        kernel.few_row_attention(q, k[..., :4].contiguous(), k[..., :4].contiguous(), None, 0.3, 0)
    with pytest.raises(RuntimeError, match=r"rows contiguous .*got k \[80, 1, 10\]"):
        kernel.few_row_attention(q, k.transpose(1, 2).contiguous().transpose(1, 2), k, None, 0.3, 0)
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        kernel.few_row_attention(q.to("meta"), k, k, None, 0.3, 0)
    with pytest.raises(RuntimeError, match=r"mask must be \(R, M\) = \(R, 10\) with 3 % R == 0 .*got \[2, 10\]"):
        kernel.few_row_attention(q, k, k, torch.zeros(2, 10), 0.3, 0)
    with pytest.raises(RuntimeError, match="n_probs must be within 0..10 .*got 11"):
        kernel.few_row_attention(q, k, k, None, 0.3, 11)


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


def _question_rows(query, key, value, mask, scaling, n_probs) -> int:
    return query.shape[2]


def test_scoring_runs_the_kernel_on_every_layer_it_needs_and_the_torch_path_agrees(engine, monkeypatch):
    torch.manual_seed(0)
    config = engine.model.config
    kv = torch.randn(config.num_hidden_layers, config.num_key_value_heads, 300, config.head_dim)
    query_ids, positions = torch.randint(0, 256, (12,)), 300 + torch.arange(12)

    def scores():
        return scoring.attention_scores(engine.model, kv, kv, query_ids, positions, [1, 2])

    got, calls = compiled_calls_during(monkeypatch, attention, "few_row_attention", scores, _question_rows)
    assert calls == [12] * 3  # layers 0, 1 and 2: the forward stops after the last scoring layer
    monkeypatch.setattr(attention, "few_row_attention", lambda *args: None)  # as where the kernel did not build
    assert torch.allclose(got, scores(), rtol=1e-5, atol=1e-7)
