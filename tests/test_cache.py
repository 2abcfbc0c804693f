"""The decode cache: appends write into spare room instead of concatenating a copy of the whole cache."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from infoflow_rag.engine import cache as cache_mod
from infoflow_rag.engine.cache import AppendingLayer, SlottedLayer, truncate


def entries(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 2, n, 4, generator=torch.Generator().manual_seed(seed))  # (B, kv_heads, n, head_dim)


def test_appends_equal_concatenation_and_reuse_one_buffer():
    layer, keys, values = AppendingLayer(), entries(10, 0), entries(10, 1)
    layer.update(keys, values)
    buffers = set()
    for step in range(200):
        k, v = entries(1 + step % 3, 2 * step + 2), entries(1 + step % 3, 2 * step + 3)
        got_k, got_v = layer.update(k, v)
        keys, values = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
        assert got_k is layer.keys and got_v is layer.values
        buffers.add(got_k.data_ptr())
    # ~400 entries appended onto 10: a buffer that grows by a quarter is replaced ~15 times, not on every append
    assert len(buffers) <= 20
    assert layer.get_seq_length() == keys.shape[-2]


def test_truncate_then_append_overwrites_what_was_cut():
    layer = AppendingLayer()
    layer.update(entries(6, 0), entries(6, 1))
    layer.update(entries(2, 2), entries(2, 3))
    kept_k, kept_v = layer.keys[..., :6, :].clone(), layer.values[..., :6, :].clone()
    cache = cache_mod.DynamicCache()
    cache.layers.append(layer)
    truncate(cache, 6)
    k, v = entries(3, 4), entries(3, 5)
    got_k, got_v = layer.update(k, v)
    assert torch.equal(got_k, torch.cat([kept_k, k], dim=-2)) and torch.equal(got_v, torch.cat([kept_v, v], dim=-2))


def test_a_tensor_set_from_outside_is_copied_never_written():
    # As compression's eviction does, or a slotted layer given no room: the layer's entries are someone else's tensor.
    outside_k, outside_v = entries(8, 0), entries(8, 1)
    before_k, before_v = outside_k.clone(), outside_v.clone()
    layer = SlottedLayer(outside_k, outside_v, slots=None)
    k, v = entries(1, 2), entries(1, 3)
    got_k, got_v = layer.update(k, v)
    assert torch.equal(got_k, torch.cat([before_k, k], dim=-2)) and torch.equal(got_v, torch.cat([before_v, v], dim=-2))
    assert torch.equal(outside_k, before_k) and torch.equal(outside_v, before_v)
    assert got_k.data_ptr() != outside_k.data_ptr()
    # Also once the layer has a buffer, and the outside tensor is laid out like it (a prefix of a buffer as long)
    room = layer._key_room
    other = torch.randn(room.shape)
    layer.keys = other[..., :4, :]
    before = other.clone()
    got_k, _ = layer.update(k, v)
    assert torch.equal(got_k, torch.cat([before[..., :4, :], k], dim=-2)) and torch.equal(other, before)
    # or a view of the layer's own buffer that is not a prefix of it (every other entry)
    own = layer._key_room
    layer.keys = own[..., ::2, :][..., :3, :]
    want = torch.cat([layer.keys, k], dim=-2)
    got_k, _ = layer.update(k, v)
    assert torch.equal(got_k, want)


@pytest.mark.parametrize("method", ["infoflow", "full"])
def test_decoding_on_the_appending_cache_equals_decoding_on_concatenation(engine, monkeypatch, method):
    passages = ["The owl sleeps by day. " * 6, "Rivers run to the sea. " * 5]
    options = {"selector": method, "ratio": 0.3} if method != "full" else {"selector": "full"}
    got = engine.answer("Where do rivers run?", passages, max_new_tokens=12, **options)
    monkeypatch.setattr(AppendingLayer, "update", DynamicLayer.update)  # transformers' concatenating append
    want = engine.answer("Where do rivers run?", passages, max_new_tokens=12, **options)
    assert got.generated_tokens > 1
    assert got.answer_ids == want.answer_ids


def test_an_answer_decodes_into_the_room_after_its_placed_prompt(engine):
    passages = ["The owl sleeps by day. " * 6, "Rivers run to the sea. " * 5]
    options = {"selector": "infoflow", "ratio": 0.3}
    prep = engine.prepare("Where do rivers run?", passages, max_new_tokens=12, **options)
    prompt_entries, room = prep.placed.prompt_keys.shape[2], prep.placed.room
    got = engine.decode(prep, max_new_tokens=12)
    assert room == 12 and got.generated_tokens > 2
    buffers = zip(prep.out.cache.layers, prep.placed.key_buffer, prep.placed.value_buffer, strict=True)
    for layer, keys, values in buffers:
        # The cache is still the placed buffers, the answer's K/V appended in their room: no copy of the prompt's.
        assert layer.keys.data_ptr() == keys.data_ptr() and layer.values.data_ptr() == values.data_ptr()
        assert prompt_entries < layer.keys.shape[2] <= prompt_entries + room
    # Without room (max_new_tokens not given to prepare), the first append copies the cache; the same answer.
    bare = engine.prepare("Where do rivers run?", passages, **options)
    assert bare.placed.room == 0
    assert engine.decode(bare, max_new_tokens=12).answer_ids == got.answer_ids
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0 .*got -1"):
        engine.prepare("Where do rivers run?", passages, max_new_tokens=-1, **options)
