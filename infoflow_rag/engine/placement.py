"""Where every prompt token sits, and the four RoPE geometries cached keys can be placed in.

A prompt is the engine's fixed prefix (always cached, always exact) followed by segments in prompt
order: cached passages (with their :class:`PassageKV`) and fresh token runs (the question block, or
text around passages found inside a framework's prompt). Global positions follow prompt order.

RoPE re-rotation is a few pure functions. A cached key was stored post-RoPE at local position p:
k_p = R(p) k * s, where ``s`` is the ``attention_scaling`` (YaRN mscale) that transformers folds into
cos/sin. Rotations compose, R(p + d) = R(d) R(p), so moving the key to position p + d only needs R(d),
*unscaled*, or the key would carry s twice. ``inv_freq`` is the model's (already linear / llama3 / YaRN
adjusted) frequency vector, which is exactly what transformers uses before multiplying by
``attention_scaling``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kv import PassageKV
from . import kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim: the pairing transformers' RoPE uses (dims i and i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def delta_cos_sin(deltas: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of R(delta) for each token: deltas (n,) int -> cos, sin (n, head_dim), unscaled.

    Angles are formed in float64: at positions in the thousands a float32 angle alone is off by ~1e-4 rad.
    """
    freqs = deltas.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # (n, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim)
    return emb.cos(), emb.sin()


def rotate_keys(
    keys: torch.Tensor, deltas: torch.Tensor, inv_freq: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Move post-RoPE keys by ``deltas`` positions.

    keys: (..., n, head_dim), any float dtype; deltas: (n,) ints (one per token; a passage shares one).
    Returns keys of the same shape and dtype, written into ``out`` if given (else a new tensor, or the input
    itself when every delta is zero). The product is taken in the keys' dtype (float32 in practice): only
    the angle needs float64. A 4K cache is ~90 MB of keys, and each pass over them costs a pass over memory: the
    compiled kernel (key_rotation.cpp) reads and writes each key once; where it does not run, in-place products on
    ``out`` take three passes rather than the four and the temporaries of ``k cos + rotate_half(k) sin``.
    """
    n, head_dim = keys.shape[-2:]
    if deltas.shape != (n,):
        raise ValueError(
            f"deltas must be one per key, shape ({n},) for keys of shape {tuple(keys.shape)}; got {tuple(deltas.shape)}"
        )
    if not bool(deltas.any()):
        return keys if out is None else out.copy_(keys)
    shared = bool((deltas == deltas[0]).all())  # a passage moves as one: one angle row for all its tokens
    cos, sin = delta_cos_sin((deltas[:1] if shared else deltas).to(keys.device), inv_freq.to(keys.device))
    cos, sin = cos.to(keys.dtype), sin.to(keys.dtype)  # (n or 1, hd), broadcast over leading dims
    out = torch.empty_like(keys) if out is None else out
    rows_contiguous = out.stride(-1) == 1 and out.stride(-2) == head_dim
    kernel = kernels.for_tensors(keys, out, cos) if keys.dim() == 4 and rows_contiguous else None
    if kernel is not None:
        kernel.rotate_keys_into(out, keys, cos.expand(n, -1), sin.expand(n, -1))
        return out
    half = head_dim // 2
    torch.mul(keys, cos, out=out)
    out[..., :half].addcmul_(keys[..., half:], sin[:, :half], value=-1)  # rotate_half: (-x2, x1)
    out[..., half:].addcmul_(keys[..., :half], sin[:, half:])
    return out


# Key geometry / question geometry used when *scoring* (the recompute itself is always global):
#   global                  keys at their prompt positions, question after the context (inference-consistent)
#   head-local/head-prompt  keys at their local prefill positions, question right after the prefix
#   tail/tail               every passage ends where the context ends, question after the context
#   head-local/tail-prompt  keys at local positions, question after the context
GEOMETRIES = ("global", "head-local/head-prompt", "tail/tail", "head-local/tail-prompt")


@dataclass
class Segment:
    token_ids: torch.Tensor  # (n,) int64
    kv: PassageKV | None = None  # None: fresh tokens, computed in the recompute forward
    exact: bool = False  # kv was prefilled with exactly this left context, so it needs no recompute
    passage: int | None = None  # index in the caller's passage list, for reporting

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class Layout:
    prefix: PassageKV  # the fixed prefix, prefilled at positions 0 .. p-1
    segments: list[Segment]  # after the prefix, in prompt order
    query_ids: torch.Tensor  # (q,) int64: the tokens whose attention scores the context (the raw question)
    query_positions: torch.Tensor  # (q,) int64: their global positions

    @property
    def prefix_len(self) -> int:
        return len(self.prefix)

    def starts(self) -> list[int]:
        """Global position of each segment's first token."""
        starts, pos = [], self.prefix_len
        for seg in self.segments:
            starts.append(pos)
            pos += len(seg)
        return starts

    @property
    def length(self) -> int:
        return self.prefix_len + sum(len(s) for s in self.segments)

    def token_ids(self) -> torch.Tensor:
        """(length,) int64: every prompt token in order, prefix first."""
        return torch.cat([self.prefix.token_ids, *(seg.token_ids for seg in self.segments)])


@dataclass
class PlacedContext:
    """Every cached token (prefix first), keys rotated into one geometry, in prompt order.

    ``keys``/``values`` are views into ``prompt_keys``/``prompt_values``, one entry per prompt position, where
    the fresh positions are zeros: the recompute's cache is that buffer, its forward fills the fresh and
    selected entries in place, so the placed keys are read, never copied, on the way to the first token, and
    decoding appends the answer's K/V into the ``room`` after them, so the buffer stays the one copy of the
    cache while the answer decodes. ``keys``/``values`` hold the cached entries only (a copy when fresh text
    sits between them).
    """

    keys: torch.Tensor  # (layers, kv_heads, N, head_dim)
    values: torch.Tensor  # (layers, kv_heads, N, head_dim)
    token_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,) global prompt positions (what the recompute mask uses)
    candidate: torch.Tensor  # (N,) bool: may be selected for recompute (tokens of non-exact passages)
    spans: list[tuple[int, int, int]]  # (passage index, start, end) ranges into N, cached passages only
    query_positions: torch.Tensor  # (q,) where the scoring question sits in this geometry
    prefix_len: int  # the first prefix_len tokens are the fixed prefix
    key_buffer: torch.Tensor  # (layers, kv_heads, M + room, head_dim), M = prompt length: entry j at position j
    value_buffer: torch.Tensor  # (layers, kv_heads, M + room, head_dim)
    room: int = 0  # entries after the prompt's in each buffer, for the answer's K/V

    @property
    def prompt_keys(self) -> torch.Tensor:
        """(layers, kv_heads, M, head_dim): the buffer's prompt entries, entry j at position j."""
        return self.key_buffer[:, :, : self.key_buffer.shape[2] - self.room]

    @property
    def prompt_values(self) -> torch.Tensor:
        """(layers, kv_heads, M, head_dim)"""
        return self.value_buffer[:, :, : self.value_buffer.shape[2] - self.room]

    @property
    def n_passage_tokens(self) -> int:
        return sum(end - start for _, start, end in self.spans)

    @property
    def cached_first(self) -> bool:
        """Whether the cached tokens are the prompt's first N positions (``keys`` is a view of ``prompt_keys``)."""
        return int(self.positions[-1]) == self.positions.numel() - 1


def place(
    layout: Layout, inv_freq: torch.Tensor, dtype: torch.dtype, geometry: str = "global", room: int = 0
) -> PlacedContext:
    """Lay the cached segments into prompt-order buffers, rotating each one's keys into ``geometry``, with ``room``
    entries left after the prompt's for the K/V decoding appends (its max_new_tokens)."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")
    p = layout.prefix_len
    context_end = layout.length - sum(len(s) for s in layout.segments if s.kv is None)
    layers, kv_heads, _, head_dim = layout.prefix.keys.shape
    key_buffer = torch.empty(layers, kv_heads, layout.length + room, head_dim, dtype=dtype)
    value_buffer = torch.empty_like(key_buffer)
    prompt_keys, prompt_values = key_buffer[:, :, : layout.length], value_buffer[:, :, : layout.length]
    ids, positions, candidate, spans = [], [], [], []

    def add(kv: PassageKV, start: int, key_start: int, can_select: bool) -> None:
        n = len(kv)
        local = kv.offset + torch.arange(n)
        rotate_keys(
            kv.keys.to(dtype), key_start + torch.arange(n) - local, inv_freq, out=prompt_keys[:, :, start : start + n]
        )
        prompt_values[:, :, start : start + n].copy_(kv.values)
        ids.append(kv.token_ids)
        positions.append(start + torch.arange(n))
        candidate.append(torch.full((n,), can_select))

    add(layout.prefix, 0, 0, False)
    n_cached = p
    for seg, start in zip(layout.segments, layout.starts(), strict=True):
        if seg.kv is None:
            # Zeros, not garbage: a fresh entry is masked until the recompute fills it, and 0 * NaN would not be 0.
            prompt_keys[:, :, start : start + len(seg)] = 0
            prompt_values[:, :, start : start + len(seg)] = 0
            continue
        if geometry == "global":
            key_start = start
        elif geometry == "tail/tail":
            key_start = context_end - len(seg)
        else:  # head-local: keys stay where the passage was prefilled
            key_start = seg.kv.offset
        add(seg.kv, start, key_start, not seg.exact)
        if seg.passage is not None:
            spans.append((seg.passage, n_cached, n_cached + len(seg)))
        n_cached += len(seg)

    all_positions = torch.cat(positions)
    if int(all_positions[-1]) == n_cached - 1:  # cached_first: the cached tokens are the prompt's first N
        keys, values = prompt_keys[:, :, :n_cached], prompt_values[:, :, :n_cached]
    else:
        keys, values = prompt_keys.index_select(2, all_positions), prompt_values.index_select(2, all_positions)
    q = layout.query_ids.numel()
    query_positions = p + torch.arange(q) if geometry == "head-local/head-prompt" else layout.query_positions
    return PlacedContext(
        keys=keys,
        values=values,
        token_ids=torch.cat(ids),
        positions=all_positions,
        candidate=torch.cat(candidate),
        spans=spans,
        query_positions=query_positions,
        prefix_len=p,
        key_buffer=key_buffer,
        value_buffer=value_buffer,
        room=room,
    )
