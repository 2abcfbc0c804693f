"""RoPE re-rotation as pure functions.

A cached key was stored post-RoPE at local position p: k_p = R(p) k * s, where ``s`` is the
``attention_scaling`` (YaRN mscale) that transformers folds into cos/sin. Rotations compose,
R(p + d) = R(d) R(p), so moving the key to position p + d only needs R(d) — *unscaled*, or the key
would carry s twice. ``inv_freq`` is the model's (already linear / llama3 / YaRN adjusted) frequency
vector, which is exactly what transformers uses before multiplying by ``attention_scaling``.
"""

from __future__ import annotations

import torch


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


def rotate_keys(keys: torch.Tensor, deltas: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE keys by ``deltas`` positions.

    keys: (..., n, head_dim), any float dtype; deltas: (n,) ints (one per token; a passage shares one).
    Returns keys of the same shape and dtype. Zero deltas return the input untouched. The product is
    taken in the keys' dtype (float32 in practice): only the angle needs float64.
    """
    if not bool(deltas.any()):
        return keys
    cos, sin = delta_cos_sin(deltas.to(keys.device), inv_freq.to(keys.device))
    cos, sin = cos.to(keys.dtype), sin.to(keys.dtype)
    return keys * cos + rotate_half(keys) * sin  # cos/sin (n, hd) broadcast over leading dims
