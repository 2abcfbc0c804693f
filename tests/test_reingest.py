"""Ingesting a source again replaces what it held: paragraphs gone from a document, and documents gone from the
source, stop being retrievable; unchanged paragraphs keep their ids and their KV; other sources are untouched."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from test_index_readonly import snapshot, unwritable
from tiny import BagOfWordsEmbedder

from infoflow_rag.index import VectorIndex
from infoflow_rag.index.passage_index import PassageIndex
from infoflow_rag.ingest import IngestSummary, ingest
from infoflow_rag.matching import KnownPassage
from infoflow_rag.pipeline import Pipeline
from infoflow_rag.store import open_store

# Paragraphs that share no word, so a search for one ranks it first by far.
P = [
    "Rivers carry silt toward deltas.",
    "Volcanoes erupt basalt lava flows.",
    "Owls hunt mice at night.",
    "Glaciers carve deep fjords slowly.",
    "Bees pollinate clover meadows.",
    "Comets trail icy dust tails.",
    "Tides follow lunar gravity.",
    "Ferns spread spores instead seeds.",
]


def write(path: Path, *paragraphs: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")


def texts(pipeline: Pipeline) -> list[str]:
    return sorted(r.text for r in pipeline.index)


def searchable(pipeline: Pipeline) -> list[str]:
    """Every passage search returns for any of P, asking for more hits than there are passages."""
    return sorted({h.text for p in P for h in pipeline.index.search(p, k=len(P) + 5)})


def counts(summary: IngestSummary) -> tuple[int, int, int, int]:
    return summary.new_passages, summary.removed_passages, summary.removed_documents, summary.kv_computed


@pytest.fixture()
def pipeline(tmp_path: Path, engine) -> Pipeline:
    return Pipeline(engine, open_store("memory"), PassageIndex.create(tmp_path / "index", BagOfWordsEmbedder()))


def test_an_edited_file_ingested_again_holds_only_its_paragraphs_of_now(tmp_path, pipeline, engine, monkeypatch):
    write(tmp_path / "docs" / "a.md", P[0], P[1])
    ingest(pipeline, tmp_path / "docs", progress=False)
    ids = {r.text: r.id for r in pipeline.index}
    write(tmp_path / "docs" / "a.md", P[1], P[2])
    prefilled: list[str] = []
    prefill = type(engine).prefill
    monkeypatch.setattr(
        type(engine), "prefill", lambda self, texts, **k: prefilled.extend(texts) or prefill(self, texts, **k)
    )
    summary = ingest(pipeline, tmp_path / "docs", progress=False)
    assert counts(summary) == (1, 1, 0, 1) and prefilled == [P[2]]  # the unchanged paragraph's KV was kept
    assert texts(pipeline) == searchable(pipeline) == sorted([P[1], P[2]]) and len(pipeline.index) == 2
    assert {r.text: r.id for r in pipeline.index}[P[1]] == ids[P[1]]
    with pytest.raises(KeyError, match=str(ids[P[0]])):
        pipeline.index.get([ids[P[0]]])
    assert [h.text for h in pipeline.index.search(P[2], k=1)] == [P[2]]
    assert len(pipeline.index.search(P[0], k=2)) == 2  # k hits, though the nearest is gone


def test_a_removed_passage_is_no_longer_known_inside_prompts(tmp_path, pipeline):
    write(tmp_path / "docs" / "a.md", P[0], P[1])
    ingest(pipeline, tmp_path / "docs", progress=False)
    write(tmp_path / "docs" / "a.md", P[1])
    ingest(pipeline, tmp_path / "docs", progress=False)
    pieces = pipeline.split_prompt(f"Context:\n{P[0]}\n\n{P[1]}\n\nQuestion: where does silt go?")
    assert [p.text for p in pieces if isinstance(p, KnownPassage)] == [P[1]]


def test_a_deleted_file_is_dropped_by_the_next_ingest_of_its_folder_from_any_working_directory(
    tmp_path, pipeline, monkeypatch
):
    write(tmp_path / "project" / "docs" / "a.md", P[0])
    write(tmp_path / "project" / "docs" / "sub" / "b.md", P[1], P[2])
    monkeypatch.chdir(tmp_path / "project")
    ingest(pipeline, "docs", progress=False)  # relative, as typed in the project
    (tmp_path / "project" / "docs" / "sub" / "b.md").unlink()
    monkeypatch.chdir(tmp_path)
    summary = ingest(pipeline, tmp_path / "project" / "docs", progress=False)  # absolute, from elsewhere
    assert counts(summary) == (0, 2, 1, 0)
    assert texts(pipeline) == searchable(pipeline) == [P[0]]


def test_ingesting_one_file_or_one_folder_leaves_the_other_sources(tmp_path, pipeline):
    docs, other = tmp_path / "docs", tmp_path / "other"
    write(docs / "a.md", P[0], P[1])
    write(docs / "b.md", P[2])
    write(other / "c.md", P[3])
    (docs / "lines.jsonl").write_text(json.dumps({"text": P[4]}) + "\n")  # a source of its own: folders read .md/.txt
    for source in (docs, other, docs / "lines.jsonl"):
        ingest(pipeline, source, progress=False)
    write(docs / "a.md", P[1])
    assert counts(ingest(pipeline, docs / "a.md", progress=False)) == (0, 1, 0, 0)
    assert texts(pipeline) == sorted(P[1:5])
    (other / "c.md").unlink()
    write(other / "d.md", P[5])  # other/ is still a folder with text, never ingested again here
    assert counts(ingest(pipeline, docs, progress=False)) == (0, 0, 0, 0)
    assert texts(pipeline) == searchable(pipeline) == sorted(P[1:5])


def test_a_paragraph_two_files_hold_stays_until_neither_holds_it(tmp_path, pipeline):
    write(tmp_path / "docs" / "a.md", P[0], P[7])
    write(tmp_path / "docs" / "b.md", P[1], P[7])
    ingest(pipeline, tmp_path / "docs", progress=False)
    write(tmp_path / "docs" / "a.md", P[0])
    assert counts(ingest(pipeline, tmp_path / "docs", progress=False)) == (0, 0, 0, 0)
    assert texts(pipeline) == sorted([P[0], P[1], P[7]])
    (tmp_path / "docs" / "b.md").unlink()
    assert counts(ingest(pipeline, tmp_path / "docs", progress=False)) == (0, 2, 1, 0)
    assert texts(pipeline) == searchable(pipeline) == [P[0]]


def test_passages_added_through_the_api_without_a_source_are_never_removed_by_an_ingest(tmp_path, pipeline):
    pipeline.index.add_passages([P[5], P[7]])
    write(tmp_path / "docs" / "a.md", P[0], P[7])
    ingest(pipeline, tmp_path / "docs", progress=False)
    write(tmp_path / "docs" / "a.md", P[0])
    assert counts(ingest(pipeline, tmp_path / "docs", progress=False)) == (0, 0, 0, 0)
    assert texts(pipeline) == searchable(pipeline) == sorted([P[0], P[5], P[7]])


def test_jsonl_lines_are_kept_through_a_line_inserted_above_and_replaced_when_edited(tmp_path, pipeline):
    path = tmp_path / "lines.jsonl"

    def lines(*objects: dict) -> None:
        path.write_text("".join(json.dumps(o) + "\n" for o in objects))

    lines({"text": P[0]}, {"id": "x", "text": P[1]}, {"text": P[2]})
    ingest(pipeline, path, progress=False)
    ids = {r.text: r.id for r in pipeline.index}
    lines({"text": P[3]}, {"text": P[0]}, {"id": "x", "text": P[1]})  # one line inserted above, the last deleted
    assert counts(ingest(pipeline, path, progress=False)) == (1, 1, 1, 1)  # by line number: 3 lines, none gone
    assert {r.text: r.id for r in pipeline.index if r.text != P[3]} == {P[0]: ids[P[0]], P[1]: ids[P[1]]}
    lines({"text": P[3]}, {"id": "x", "text": P[4]})  # the line of P0 deleted, line x edited
    assert counts(ingest(pipeline, path, progress=False)) == (1, 2, 1, 1)
    assert texts(pipeline) == searchable(pipeline) == sorted([P[3], P[4]])


# --- index directories written before documents were tracked ---------------------------------------------------

# The records' schema as it was: no document_passages table.
OLD_SCHEMA = """
CREATE TABLE passages (id INTEGER PRIMARY KEY, text TEXT NOT NULL, source TEXT, metadata TEXT NOT NULL,
    content_hash TEXT NOT NULL UNIQUE, n_tokens INTEGER, created_at TEXT NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"""


def old_index(directory: Path, passages: list[tuple[str, str | None, str | None]]) -> None:
    """An index directory as the version before wrote it: ``passages`` as (text, source, metadata "document"), ids
    from 1, in a flat index, sources as that ingest recorded them (paths as given, "<file>:<line>" for .jsonl)."""
    directory.mkdir()
    identity = "0" * 32
    conn = sqlite3.connect(directory / "passages.sqlite")
    with conn:
        conn.executescript(OLD_SCHEMA)
        conn.executemany(
            "INSERT INTO passages VALUES (?, ?, ?, ?, ?, NULL, '2025-01-01T00:00:00+00:00')",
            [
                (
                    i,
                    text,
                    source,
                    json.dumps({"document": doc} if doc else {}),
                    hashlib.sha256(text.encode()).hexdigest(),
                )
                for i, (text, source, doc) in enumerate(passages, start=1)
            ],
        )
        conn.execute("INSERT INTO meta VALUES ('identity', ?)", (identity,))
    conn.close()
    vectors = VectorIndex.create(BagOfWordsEmbedder.dim)
    vectors.add(range(1, len(passages) + 1), BagOfWordsEmbedder().encode([text for text, _, _ in passages]))
    vectors.identity = identity
    vectors.save(directory / "vectors.faiss")
    meta = {"format_version": 2, "identity": identity, "embedder": BagOfWordsEmbedder.name, "dim": 64, "kind": "flat"}
    (directory / "index.json").write_text(json.dumps({**meta, "params": {}}))


OLD_PASSAGES = [
    (P[0], "docs/a.md", "a.md"),
    (P[1], "docs/a.md", "a.md"),
    (P[2], "docs/b.md", "b.md"),
    (P[3], "other/c.md", "c.md"),
    (P[4], "lines.jsonl:1", "x"),
    (P[5], None, None),  # added through the API
]


def test_an_index_of_the_version_before_is_linked_on_its_first_writable_open_and_replaced_by_ingest(
    tmp_path, engine, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # where the earlier ingests ran: its sources are relative to it
    old_index(tmp_path / "index", OLD_PASSAGES)
    write(tmp_path / "docs" / "a.md", P[1], P[6])  # edited; docs/b.md deleted
    write(tmp_path / "other" / "c.md", P[3])
    (tmp_path / "lines.jsonl").write_text(json.dumps({"id": "x", "text": P[4]}) + "\n")
    pipeline = Pipeline(engine, open_store("memory"), PassageIndex.open(tmp_path / "index", BagOfWordsEmbedder()))
    summary = ingest(pipeline, "docs", progress=False)
    assert counts(summary) == (1, 2, 1, 2)  # P0 and b.md's P2 removed; the store was empty: both texts prefilled
    assert {r.text: r.id for r in pipeline.index} == {P[1]: 2, P[3]: 4, P[4]: 5, P[5]: 6, P[6]: 7}
    assert searchable(pipeline) == sorted([P[1], P[3], P[4], P[5], P[6]])
    assert counts(ingest(pipeline, tmp_path / "lines.jsonl", progress=False))[:3] == (0, 0, 0)  # the line kept its id


def test_an_index_of_the_version_before_is_searched_read_only_and_left_unchanged(tmp_path):
    old_index(tmp_path / "index", OLD_PASSAGES)
    before = snapshot(tmp_path / "index")
    with unwritable(tmp_path / "index"), PassageIndex.open(tmp_path / "index", BagOfWordsEmbedder()) as index:
        assert [h.text for h in index.search(P[2], k=1)] == [P[2]] and len(index) == len(OLD_PASSAGES)
    assert snapshot(tmp_path / "index") == before  # no table added, nothing written
