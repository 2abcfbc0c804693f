"""The KV cache as the model sees it: a DynamicCache built from stacked tensors, layers that decoding appends to in
place, and the additive position mask.

An explicit additive 4D mask is passed wherever the attention needs one: with SDPA and no mask transformers assumes
is_causal, which is wrong for sparse queries, and a bool mask would be wrong under eager attention. Under a
sparse-query plan (the recompute, CacheBlend's check pass) none is: the attention reads the plan's positions.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (1, 1, q, K): query i sees key j iff pos_k[j] <= pos_q[i]."""
    visible = k_pos[None, :] <= q_pos[:, None]  # (q, K)
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def cache_from(keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
    """keys/values (layers, kv_heads, n, head_dim) or (layers, B, kv_heads, n, head_dim) -> DynamicCache.

    The layers take the given tensors as they are (no copy); the forward's update concatenates onto them
    into new tensors, so the caller's tensors are never written to.
    """
    if keys.dim() == 4:
        keys, values = keys[:, None], values[:, None]
    cache = DynamicCache()
    for k, v in zip(keys.unbind(0), values.unbind(0), strict=True):
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


class AppendingLayer(DynamicLayer):
    """A cache layer whose appends write into spare room at the end of a buffer: ``keys``/``values`` are views
    of its first entries. transformers' DynamicLayer concatenates a new tensor on every forward, which copies the
    whole cache to add one decoded token (over a 4K SmolLM2 prompt, ~190 MB: ~12 ms of a ~78 ms step). A full
    buffer grows by a quarter, so each entry is copied a bounded number of times however long decoding runs.

    Whatever sets ``keys``/``values`` from outside keeps working: a shorter view of the buffer (``truncate``) is
    appended after, overwriting what it cut; a tensor of its own (compression's eviction) is copied into a new
    buffer on the next append and never written to. The recompute's layers start with the placed buffers as
    theirs (:class:`SlottedLayer`), so an answer appends after its prompt's entries without a copy.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._key_room: torch.Tensor | None = None  # the buffers keys/values are the first entries of, once there
        self._value_room: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            # The first forward's K/V, stored as DynamicLayer stores them (contiguous, no room): the attention
            # kernel reads contiguous heads, and a prompt is rarely followed by more appends than its length / 4.
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states.contiguous(), value_states.contiguous()
            return self.keys, self.values
        self.keys, self._key_room = _appended(self.keys, self._key_room, key_states)
        self.values, self._value_room = _appended(self.values, self._value_room, value_states)
        return self.keys, self.values


def _appended(entries: torch.Tensor, room: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``entries`` (B, H, n, d) followed by ``new`` (B, H, m, d), written into ``room`` (B, H, capacity, d) when
    ``entries`` is its first n entries and m more fit, else into a new buffer. -> (view of n + m entries, buffer)"""
    n, total = entries.shape[-2], entries.shape[-2] + new.shape[-2]
    is_prefix = room is not None and entries.data_ptr() == room.data_ptr() and entries.stride() == room.stride()
    if not is_prefix or room.shape[-2] < total:
        room = entries.new_empty(*entries.shape[:-2], total + max(total // 4, 16), entries.shape[-1])
        room[..., :n, :] = entries
    room[..., n:total, :] = new
    return room[..., :total, :], room


class SlottedLayer(AppendingLayer):
    """A cache layer in prompt order whose next forward writes its inputs' K/V into reserved slots instead of
    appending them: the recompute's keys stay sorted by position, so a query's visible keys are a prefix. Later
    forwards append into the ``room`` entries after the prompt's, then into a new buffer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, room: int = 0):
        super().__init__()
        self.lazy_initialization(keys, values)
        entries = keys.shape[-2] - room
        self.keys, self.values, self.slots = keys[..., :entries, :], values[..., :entries, :], slots
        self._key_room, self._value_room = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.slots is None:  # later forwards (decoding, teacher forcing) append
            return super().update(key_states, value_states, *args, **kwargs)
        self.keys.index_copy_(2, self.slots, key_states)
        self.values.index_copy_(2, self.slots, value_states)
        self.slots = None
        return self.keys, self.values


def slotted_cache(keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, room: int = 0) -> DynamicCache:
    """keys/values (layers, kv_heads, M + room, head_dim), written to in place: the cache is their first M entries,
    the room is where later forwards append; slots (Q,): entries the next forward fills with its inputs, in input
    order."""
    cache = DynamicCache()
    for k, v in zip(keys[:, None].unbind(0), values[:, None].unbind(0), strict=True):
        cache.layers.append(SlottedLayer(k, v, slots, room))
    return cache


def appending_cache(layers: int) -> DynamicCache:
    """An empty cache of ``layers`` :class:`AppendingLayer` s, for a forward whose cache decoding extends."""
    cache = DynamicCache()
    cache.layers.extend(AppendingLayer() for _ in range(layers))
    return cache


def stacked(cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
    """DynamicCache -> keys, values (layers, B, kv_heads, n, head_dim)."""
    return torch.stack([layer.keys for layer in cache.layers]), torch.stack([layer.values for layer in cache.layers])


def truncate(cache: DynamicCache, entries: int) -> None:
    """Keep the first ``entries`` cache entries of every layer (what a forward appended after them goes)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :entries], layer.values[:, :, :entries]
