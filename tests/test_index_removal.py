"""Removing passages from a passage index, for every index kind: what search, get and iteration see, a kill between
the records' commit and the vectors' save, a second process whose vectors are stale, and ids never given twice."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from test_index import synthetic_corpus
from test_index_readonly import unwritable
from tiny import BagOfWordsEmbedder

from infoflow_rag.errors import IndexIntegrityError
from infoflow_rag.index import PassageIndex, VectorIndex
from infoflow_rag.index.documents import DocumentKey, Scope
from infoflow_rag.index.faiss_index import stored_count

CORPUS = synthetic_corpus(100)
SCOPE = Scope("/corpus", folder=True)
# IVF with nlist 2 is trained once it holds 78 vectors; with nlist 4 (156) it still searches its flat buffer.
KINDS = {
    "flat": {},
    "hnsw": {"M": 8, "ef_search": 128},
    "ivf-trained": {"nlist": 2, "nprobe": 2},
    "ivf-untrained": {"nlist": 4, "nprobe": 4},
}


def document(i: int) -> DocumentKey:
    return DocumentKey(f"/corpus/{i}.md", "")


def build(directory: Path, kind: str) -> list[int]:
    """CORPUS indexed as 100 documents of one passage each; their ids."""
    with PassageIndex.create(directory, BagOfWordsEmbedder(), kind.split("-")[0], **KINDS[kind]) as index:
        return index.add_passages(CORPUS, documents=[document(i) for i in range(len(CORPUS))]).ids


def keep(index: PassageIndex, ids: list[int], kept: range) -> list[int]:
    """The documents of ``kept`` are left, the others gone; the ids removed."""
    return index.replace_documents(SCOPE, {document(i): {ids[i]} for i in kept}).passage_ids


def nearest_scores(query: str, texts: list[str], k: int) -> list[float]:
    """The k best scores among ``texts``, by brute force over their embeddings."""
    embedder = BagOfWordsEmbedder()
    return sorted((embedder.encode(texts) @ embedder.encode([query])[0]).tolist(), reverse=True)[:k]


def check_search(index: PassageIndex, kept: range, k: int = 10) -> None:
    """Searches for removed and kept passages return k kept ones, with the scores brute force gives."""
    texts = [CORPUS[i] for i in kept]
    for query in (CORPUS[0], CORPUS[kept[0]], CORPUS[99]):
        hits = index.search(query, k)
        assert len(hits) == k and {h.text for h in hits} <= set(texts)
        assert [h.score for h in hits] == pytest.approx(nearest_scores(query, texts, k), abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_removed_passages_leave_search_get_and_iteration_and_hnsw_is_rebuilt_past_half(tmp_path, kind):
    ids = build(tmp_path, kind)
    with PassageIndex.open(tmp_path, BagOfWordsEmbedder()) as index:
        assert keep(index, ids, range(30, 100)) == ids[:30]
        assert len(index) == 70 and [r.id for r in index] == ids[30:]
        with pytest.raises(KeyError, match=str(ids[0])):
            index.get([ids[0]])
        check_search(index, range(30, 100))
        # HNSW keeps the vectors of removed passages (skipped by search) until they are more than the live ones.
        assert stored_count(tmp_path / "vectors.faiss") == (100 if kind == "hnsw" else 70)
        assert keep(index, ids, range(60, 100)) == ids[30:60]
        assert stored_count(tmp_path / "vectors.faiss") == 40
        check_search(index, range(60, 100))
    with PassageIndex.open(tmp_path, BagOfWordsEmbedder()) as index:
        check_search(index, range(60, 100))


def _killed(*args: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("kind", KINDS)
def test_a_removal_killed_between_the_records_commit_and_the_vectors_save_never_returns_a_removed_passage(
    tmp_path, kind, monkeypatch, caplog
):
    ids = build(tmp_path, kind)
    with PassageIndex.open(tmp_path, BagOfWordsEmbedder()) as index:
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(VectorIndex, "save", _killed)
            keep(index, ids, range(60, 100))  # more than half: HNSW saves a rebuilt graph too
    with sqlite3.connect(tmp_path / "passages.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM passages").fetchone() == (40,)  # the records were committed
    conn.close()
    assert stored_count(tmp_path / "vectors.faiss") == 100  # the vectors were not
    with unwritable(tmp_path), PassageIndex.open(tmp_path, BagOfWordsEmbedder()) as index:
        check_search(index, range(60, 100))
    with caplog.at_level(logging.WARNING, logger="infoflow_rag.index"):
        index = PassageIndex.open(tmp_path, BagOfWordsEmbedder())
    assert "dropped 60 vectors of passages removed" in caplog.text
    assert stored_count(tmp_path / "vectors.faiss") == 40
    check_search(index, range(60, 100))
    index.close()


def test_vectors_of_ids_no_removal_took_are_still_refused(tmp_path):
    ids = build(tmp_path, "flat")
    with PassageIndex.open(tmp_path, BagOfWordsEmbedder()) as index:
        keep(index, ids, range(10, 100))
        (added,) = index.add_passages(["added after the removal"]).ids
    with sqlite3.connect(tmp_path / "passages.sqlite") as conn:  # records that lost a passage no removal took
        conn.execute("DELETE FROM passages WHERE id = ?", (added,))
    conn.close()
    with pytest.raises(IndexIntegrityError, match="holds 1 passage ids missing from passages.sqlite"):
        PassageIndex.open(tmp_path, BagOfWordsEmbedder())


@pytest.mark.parametrize("kind", KINDS)
def test_a_process_whose_vectors_predate_a_removal_skips_the_removed_passages_and_still_finds_k(tmp_path, kind):
    ids = build(tmp_path, kind)
    server = PassageIndex.open(tmp_path, BagOfWordsEmbedder())  # opened before the ingest below
    with PassageIndex.open(tmp_path, BagOfWordsEmbedder()) as ingesting:
        keep(ingesting, ids, range(60, 100))
    check_search(server, range(60, 100))
    server.close()


def test_a_removed_id_is_never_given_again(tmp_path):
    """A process whose vectors still hold a removed passage's id adds a passage: it must get a new id, or that old
    vector would be searched as the new passage's."""
    ids = build(tmp_path, "flat")
    stale = PassageIndex.open(tmp_path, BagOfWordsEmbedder())
    with PassageIndex.open(tmp_path, BagOfWordsEmbedder()) as ingesting:
        keep(ingesting, ids, range(0, 99))  # the last passage, with the highest id
    text = "a passage added after the removal elsewhere"
    (new_id,) = stale.add_passages([text]).ids
    assert new_id > max(ids)
    for index in (stale, PassageIndex.open(tmp_path, BagOfWordsEmbedder())):
        hit = index.search(text, k=1)[0]
        assert (hit.text, hit.score) == (text, pytest.approx(1.0))
        index.close()
