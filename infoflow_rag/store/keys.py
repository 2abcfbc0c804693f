"""Content-addressed cache keys: which model made the K/V, and for which tokens."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_SEPARATOR = "#"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CacheKey:
    """``fingerprint`` names the producer (model, config, dtype, fixed prefix); ``token_hash`` the tokens.

    The fingerprint is opaque: the engine computes it and the store only compares it, so K/V from
    another model or tokenizer can never be served for the same text.
    """

    fingerprint: str
    token_hash: str  # sha256 hex of the passage token ids as little-endian int64

    def __post_init__(self) -> None:
        if not self.fingerprint:
            raise ValueError("CacheKey fingerprint is empty; pass the engine's model fingerprint")
        if not _HEX64.fullmatch(self.token_hash):
            raise ValueError(
                f"CacheKey token_hash {self.token_hash!r} is not 64 lowercase hex digits; "
                "build keys with CacheKey.for_tokens(fingerprint, token_ids)"
            )

    @classmethod
    def for_tokens(cls, fingerprint: str, token_ids: torch.Tensor | Sequence[int]) -> CacheKey:
        """Key for ``token_ids`` under ``fingerprint`` (sha256 of the ids as little-endian int64)."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.detach().cpu().numpy()
        ids = np.ascontiguousarray(token_ids, dtype="<i8")  # (n,)
        return cls(fingerprint, hashlib.sha256(ids.tobytes()).hexdigest())

    @property
    def fingerprint_digest(self) -> str:
        """Fixed-length stand-in for the fingerprint, safe in file names and Redis keys."""
        return hashlib.sha256(self.fingerprint.encode()).hexdigest()[:32]

    def to_string(self) -> str:
        return f"{self.fingerprint}{_SEPARATOR}{self.token_hash}"
