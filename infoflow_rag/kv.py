"""The unit of reuse: one passage's prefill, computed once, alone, behind the model's fixed prefix."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PassageKV:
    """K/V of one passage prefilled alone at local positions ``offset .. offset + n - 1``.

    Keys are post-RoPE (rotated at their local positions); values carry no position. Storage
    backends treat this as plain tensors: they never need to know which model made them.
    """

    token_ids: torch.Tensor  # (n,) int64: the passage tokens, fixed prefix excluded
    keys: torch.Tensor  # (layers, kv_heads, n, head_dim), post-RoPE at local positions
    values: torch.Tensor  # (layers, kv_heads, n, head_dim)
    offset: int  # local position of the first passage token (= length of the fixed prefix, and lead-in if any)
    # Optional per-token signals computed at prefill (e.g. "entropy", "evolution"), each (n,) float32.
    signals: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.token_ids.shape[0])
        if self.keys.shape != self.values.shape or self.keys.dim() != 4 or self.keys.shape[2] != n:
            raise ValueError(
                f"PassageKV shapes disagree: token_ids {tuple(self.token_ids.shape)}, "
                f"keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)}; "
                "expected keys/values (layers, kv_heads, n, head_dim) with n = len(token_ids)"
            )

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        tensors = [self.token_ids, self.keys, self.values, *self.signals.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def head(self, n: int) -> PassageKV:
        """The first ``n`` tokens: still exact, because a causal prefill of a prefix ignores what follows."""
        return PassageKV(
            token_ids=self.token_ids[:n],
            keys=self.keys[:, :, :n],
            values=self.values[:, :, :n],
            offset=self.offset,
            signals={name: s[:n] for name, s in self.signals.items()},
        )
