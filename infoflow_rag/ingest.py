"""Ingest a source into an index directory: split, embed, prefill, store — resumable after a crash.

Each batch is committed in this order: passage records + vectors (the index repairs a kill between
those two on open), then KV files (each written atomically). A re-run skips passages already indexed
(content hash) and KV already stored (key check), so a killed ingest resumes where it stopped.

Then the source replaces what it held before: a document ingested again holds only its passages of now, and the
documents ingested earlier from under the source that it no longer has hold none (see ``index.documents``);
passages no document holds any more are removed. Until then (a kill before the end) the old passages stay beside
the new, as before the run; a re-run finishes the replacement.

Every passage is checked before anything is written: one longer than the model's window is split into
token windows that fit, so no stored passage can fail a later query or stop a re-run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .engine import Engine
from .engine.prompt import encode
from .index.documents import DocumentKey, Scope
from .index.splitting import MIN_WINDOW, TEXT_SUFFIXES, Document, load_source, split_paragraphs, split_token_windows
from .pipeline import Pipeline

SPLITS = ("paragraph", "tokens")
# Characters per token assumed where paragraphs are cut by length before any tokenizer runs (English prose: ~4).
CHARS_PER_TOKEN = 4


@dataclass
class IngestSummary:
    documents: int
    passages: int  # passages in the source after splitting
    new_passages: int  # added to the index by this run
    removed_passages: int  # removed by this run: no document holds them any more
    removed_documents: int  # ingested earlier from under the source, gone from it now
    kv_computed: int  # passages prefilled by this run (the rest were already stored)
    tokens: int  # passage tokens prefilled by this run
    kv_bytes: int  # bytes of KV prefilled by this run (in memory, float32)
    seconds: float

    @property
    def passages_per_s(self) -> float:
        return self.kv_computed / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "passages_per_s": self.passages_per_s, "tokens_per_s": self.tokens_per_s}


def split_documents(texts: list[str], split: str, window: int, tokenize: Callable, detokenize: Callable) -> list[str]:
    if split == "paragraph":
        return [p for text in texts for p in split_paragraphs(text, max_chars=window * CHARS_PER_TOKEN)]
    if split == "tokens":
        return [
            w.text
            for text in texts
            for w in split_token_windows(text, window, tokenize=tokenize, detokenize=detokenize)
        ]
    raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def fitting_passages(engine: Engine, texts: list[str], window: int) -> list[str]:
    """The texts as passages the engine can prefill, in order: each text itself, or token windows of at most
    ``window`` tokens when it is longer than the model's context window; whitespace-only texts are dropped."""

    def tokenize(text: str) -> list[int]:
        return encode(engine.tokenizer, text)

    limit = engine.max_positions - len(engine.passage_context) - len(tokenize(engine.format.separator))
    out = []
    for text in texts:
        if not text.strip():
            continue
        if len(tokenize(text)) <= limit:
            out.append(text)
        else:
            windows = split_token_windows(
                text, min(window, limit), tokenize=tokenize, detokenize=engine.tokenizer.decode
            )
            parts = [w.text for w in windows if w.text.strip()]
            for part in parts:
                engine.passage_ids(part)  # a window that re-tokenizes longer is refused here, before any write
            out.extend(parts)
    return out


def no_documents(source: str | Path, follow_symlinks: bool = False, blank: int = 0) -> ValueError:
    """The error for a source :func:`load_source` found no document with text in (``blank``: how many it found that
    hold only whitespace): it says what was looked for."""
    path = Path(source)
    looked = (
        f"{'/'.join(TEXT_SUFFIXES)} files in it and its subfolders (UTF-8"
        + (")" if follow_symlinks else ", not linked from outside it)")
        if path.is_dir()
        else 'non-blank JSON lines with a "text"'
        if path.suffix.lower() == ".jsonl"
        else "readable UTF-8 text"
    )
    found = f"; the {blank} found hold only whitespace" if blank else ""
    return ValueError(f"no documents with text in {path}: looked for {looked}{found}; nothing was indexed")


def check_has_text(documents: list[Document], source: str | Path, follow_symlinks: bool = False) -> None:
    """Refuse a source none of whose documents holds text: it would index nothing."""
    if not any(doc.text.strip() for doc in documents):
        raise no_documents(source, follow_symlinks, blank=len(documents))


def ingest(
    pipeline: Pipeline,
    source: str | Path,
    split: str = "paragraph",
    window: int = 256,
    batch_size: int = 64,
    progress: bool = True,
    *,
    strict_utf8: bool = False,
    follow_symlinks: bool = False,
    documents: list[Document] | None = None,
) -> IngestSummary:
    """Index and prefill every passage of ``source`` (folder of .txt/.md, or .jsonl), and remove the passages of its
    documents that they no longer hold (see the module docstring).

    ``strict_utf8`` and ``follow_symlinks`` as in :func:`load_source`: by default non-UTF-8 files and files
    linked from outside the folder are skipped with a warning. ``documents``: ``source`` already read by
    :func:`load_source`. A source without documents is refused (:func:`no_documents`).
    """
    if window < MIN_WINDOW:
        raise ValueError(f"window must be at least {MIN_WINDOW} tokens, got {window}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1 passage, got {batch_size}")
    t0 = time.perf_counter()
    docs = (
        documents
        if documents is not None
        else load_source(source, strict_utf8=strict_utf8, follow_symlinks=follow_symlinks)
    )
    check_has_text(docs, source, follow_symlinks)
    pipeline.index.check_writable()  # before the passages are split and a progress bar is shown
    engine = pipeline.engine
    tok = engine.tokenizer
    passages, sources, metas, keys = [], [], [], []
    for doc in docs:
        texts = split_documents([doc.text], split, window, lambda s: encode(tok, s), tok.decode)
        for text in fitting_passages(engine, texts, window):
            passages.append(text)
            sources.append(doc.source)
            metas.append({**doc.metadata, "document": doc.id, **({"title": doc.title} if doc.title else {})})
            keys.append(doc.key)
    # Every document read, with the passages it holds now (none: it was emptied, and gives up all it held).
    held: dict[DocumentKey, set[int]] = {doc.key: set() for doc in docs if doc.key is not None}
    summary = IngestSummary(len(docs), len(passages), 0, 0, 0, 0, 0, 0, 0.0)
    bar = tqdm(total=len(passages), desc="ingest", unit="passage", disable=not progress)
    for start in range(0, len(passages), batch_size):
        end = start + batch_size
        added = pipeline.index.add_passages(
            passages[start:end], sources[start:end], metas[start:end], documents=keys[start:end]
        )
        for key, passage_id in zip(keys[start:end], added.ids, strict=True):
            if key is not None:
                held[key].add(passage_id)
        summary.new_passages += len(added.new_ids)  # this run's own: other writers' passages are not counted
        pipeline.matcher.add(zip(added.ids, passages[start:end], strict=True))
        lookup = pipeline.kv_for(passages[start:end])
        summary.kv_computed += lookup.computed
        summary.tokens += sum(len(kv) for kv, new in zip(lookup.kvs, lookup.fresh, strict=True) if new)
        summary.kv_bytes += sum(kv.nbytes for kv, new in zip(lookup.kvs, lookup.fresh, strict=True) if new)
        bar.update(len(passages[start:end]))
    bar.close()
    removal = pipeline.index.replace_documents(Scope.of(source), held, show_progress=progress)
    pipeline.matcher.remove(removal.passage_ids)  # a prompt quoting one is no longer answered as a known passage
    summary.removed_passages, summary.removed_documents = len(removal.passage_ids), removal.documents
    summary.seconds = time.perf_counter() - t0
    return summary
