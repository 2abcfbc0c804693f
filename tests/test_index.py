"""Passage index: SQLite records, FAISS kinds, reopen, dedupe, crash repair, the offline embedder."""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from tiny import BagOfWordsEmbedder

from infoflow_rag.errors import IndexIntegrityError
from infoflow_rag.index import (
    IVF_TRAIN_FACTOR,
    Embedder,
    IndexSpec,
    PassageIndex,
    PassageRecords,
    VectorIndex,
    content_hash,
)

FACTS = [
    "The Rhine rises in the Swiss Alps and flows to the North Sea.",
    "Marie Curie won two Nobel prizes, in physics and in chemistry.",
    "The capital of Australia is Canberra, not Sydney.",
    "Basalt forms when lava cools quickly at the surface.",
]


def synthetic_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocabulary = [f"word{i}" for i in range(300)]
    return [" ".join(rng.sample(vocabulary, 10)) for _ in range(n)]


# ---------------------------------------------------------------- records


def test_records_dedupe_within_and_across_batches(tmp_path: Path) -> None:
    with PassageRecords(tmp_path / "p.sqlite") as records:
        first = records.add_many(["a", "b", "a"], sources=["s1", "s2", "s3"], metadatas=[{"k": 1}, {}, {}])
        assert first.ids[0] == first.ids[2] and first.new_ids == first.ids[:2]
        second = records.add_many(["b", "c"], n_tokens=[None, 4])
        assert second.ids[0] == first.ids[1] and second.new_ids == [second.ids[1]]
        assert records.count() == len(records) == 3
        a = records.get_many([first.ids[0]])[0]
        assert (a.text, a.source, a.metadata, a.content_hash) == ("a", "s1", {"k": 1}, content_hash("a"))
        assert next(r for r in records if r.text == "c").n_tokens == 4
        assert [r.text for r in records] == ["a", "b", "c"]
        assert [r.text for r in records.get_many(second.ids[::-1])] == ["c", "b"]


def test_records_batch_is_all_or_nothing(tmp_path: Path) -> None:
    with PassageRecords(tmp_path / "p.sqlite") as records:
        records.add_many(["kept"])
        with pytest.raises(TypeError):
            records.add_many(["x", "y", "z"], metadatas=[{}, {}, {"bad": object()}])
        assert [r.text for r in records] == ["kept"]


def test_records_reject_mismatched_columns_and_unknown_ids(tmp_path: Path) -> None:
    with PassageRecords(tmp_path / "p.sqlite") as records:
        with pytest.raises(ValueError, match="sources has 1 entries for 2 texts"):
            records.add_many(["a", "b"], sources=["s"])
        with pytest.raises(KeyError, match=r"\[42\]"):
            records.get_many([42])


def test_records_persist_in_wal_mode(tmp_path: Path) -> None:
    with PassageRecords(tmp_path / "p.sqlite") as records:
        records.add_many(["a"])
    with sqlite3.connect(tmp_path / "p.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with PassageRecords(tmp_path / "p.sqlite") as records:
        assert [r.text for r in records] == ["a"]


# ---------------------------------------------------------------- vector index


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("annoy", {}, "unknown index kind 'annoy'"),
        ("flat", {"nlist": 4}, r"unknown parameters \['nlist'\] for a 'flat' index; accepted: none"),
        ("hnsw", {"M": 0}, "positive integers"),
    ],
)
def test_index_spec_rejects_bad_kind_and_params(kind: str, params: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IndexSpec.build(kind, 8, **params)


def test_vector_index_rejects_wrong_shapes() -> None:
    index = VectorIndex.create(8)
    with pytest.raises(ValueError, match=r"expected \(n,\) and \(n, 8\)"):
        index.add([1, 2], np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected k > 0 and \(q, 8\)"):
        index.search(np.zeros((2, 16), dtype=np.float32), 3)
    assert index.search(np.zeros(8, dtype=np.float32), 3).ids.shape == (1, 3)


def test_ivf_searches_exactly_until_it_has_enough_vectors_to_train(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nlist, needed = 4, IVF_TRAIN_FACTOR * 4
    vectors = rng.standard_normal((needed + 10, 16)).astype(np.float32)  # (n, dim)
    ivf, flat = VectorIndex.create(16, "ivf", nlist=nlist, nprobe=nlist), VectorIndex.create(16)
    ivf.add(np.arange(needed - 1), vectors[: needed - 1])
    flat.add(np.arange(needed - 1), vectors[: needed - 1])
    assert not ivf.is_trained
    assert np.array_equal(ivf.search(vectors[:5], 3).ids, flat.search(vectors[:5], 3).ids)
    ivf.save(tmp_path / "pending.faiss")
    assert not VectorIndex.load(tmp_path / "pending.faiss", ivf.spec).is_trained
    ivf.add(np.arange(needed - 1, needed + 10), vectors[needed - 1 :])
    assert ivf.is_trained and len(ivf) == needed + 10
    assert sorted(ivf.ids().tolist()) == list(range(needed + 10))
    # nprobe = nlist scans every list, so the trained IVF is exact too
    flat.add(np.arange(needed - 1, needed + 10), vectors[needed - 1 :])
    assert np.array_equal(ivf.search(vectors[:5], 3).ids, flat.search(vectors[:5], 3).ids)


def test_vector_index_load_rejects_a_mismatched_spec(tmp_path: Path) -> None:
    VectorIndex.create(8, "flat").save(tmp_path / "v.faiss")
    with pytest.raises(ValueError, match="do not belong together"):
        VectorIndex.load(tmp_path / "v.faiss", IndexSpec.build("hnsw", 8))


# ---------------------------------------------------------------- passage index


@pytest.mark.parametrize(
    ("kind", "params"),
    [("flat", {}), ("hnsw", {"M": 8, "ef_search": 16}), ("ivf", {"nlist": 4, "nprobe": 2})],
)
def test_reopen_gives_identical_results(tmp_path: Path, kind: str, params: dict[str, int]) -> None:
    corpus = synthetic_corpus(200)
    queries = [corpus[3], corpus[150], " ".join(corpus[7].split()[:4])]
    with PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder(), kind=kind, **params) as index:
        ids = index.add_passages(corpus, sources=[f"doc{i}" for i in range(200)]).ids
        before = [index.search(q, k=5) for q in queries]
    assert before[0][0].id == ids[3] and before[0][0].score == pytest.approx(1.0)
    assert before[1][0].source == "doc150"
    with PassageIndex.open(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        assert len(index) == 200
        assert [index.search(q, k=5) for q in queries] == before


def test_index_json_records_the_configuration(tmp_path: Path) -> None:
    PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder(), kind="hnsw", M=8).close()
    meta = (tmp_path / "index.json").read_text()
    for expected in (
        '"format_version": 2',
        '"embedder": "test-bag-of-words"',
        '"dim": 64',
        '"kind": "hnsw"',
        '"M": 8',
    ):
        assert expected in meta
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".create.lock",
        "index.json",
        "passages.sqlite",
        "vectors.faiss",
    ]


def test_add_passages_dedupes_without_reembedding(tmp_path: Path) -> None:
    embedder = BagOfWordsEmbedder()
    with PassageIndex.create(tmp_path, embedder=embedder) as index:
        first = index.add_passages(FACTS[:2]).ids
        added = index.add_passages([FACTS[1], FACTS[2], FACTS[2]])
        second = added.ids
        assert added.new_ids == [second[1]]
        assert second[0] == first[1] and second[1] == second[2]
        assert embedder.calls == [FACTS[:2], [FACTS[2]]]
        assert len(index) == 3
        assert [r.text for r in index.get(second)] == [FACTS[1], FACTS[2], FACTS[2]]


def test_open_repairs_records_committed_without_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        index.add_passages(FACTS[:2])
        with monkeypatch.context() as m:  # die between the SQLite commit and the FAISS write

            def killed(*args: object) -> None:
                raise KeyboardInterrupt

            m.setattr(VectorIndex, "save", killed)
            with pytest.raises(KeyboardInterrupt):
                index.add_passages(FACTS[2:])
    embedder = BagOfWordsEmbedder()
    with caplog.at_level(logging.WARNING, logger="infoflow_rag.index"):
        index = PassageIndex.open(tmp_path, embedder=embedder)
    assert "embedded 2 passages missing" in caplog.text
    assert embedder.calls == [FACTS[2:]]
    assert index.search("capital of Australia", k=1)[0].text == FACTS[2]
    index.close()
    embedder = BagOfWordsEmbedder()
    PassageIndex.open(tmp_path, embedder=embedder).close()
    assert embedder.calls == []  # the repair was saved


def test_failed_embedding_is_retried_by_the_next_add(tmp_path: Path) -> None:
    class FailingOnce(BagOfWordsEmbedder):
        def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
            if not self.calls:
                self.calls.append([])
                raise RuntimeError("out of memory")
            return super().encode(texts, batch_size, show_progress)

    embedder = FailingOnce()
    with PassageIndex.create(tmp_path, embedder=embedder) as index:
        with pytest.raises(RuntimeError):
            index.add_passages(FACTS[:2])
        assert len(index) == 2  # committed, but not searchable yet
        index.add_passages(FACTS[2:3])
        assert embedder.calls[1] == FACTS[:3]
        assert index.search("Rhine North Sea", k=1)[0].text == FACTS[0]


def test_open_and_create_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="use PassageIndex.create"):
        PassageIndex.open(tmp_path)
    PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder()).close()
    with pytest.raises(FileExistsError, match="use PassageIndex.open"):
        PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder())
    other = BagOfWordsEmbedder()
    other.name = "another-model"
    with pytest.raises(ValueError, match="built with embedder 'test-bag-of-words', not 'another-model'"):
        PassageIndex.open(tmp_path, embedder=other)


def test_search_on_small_index_returns_fewer_hits(tmp_path: Path) -> None:
    with PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        assert index.search("anything", k=3) == []
        index.add_passages(FACTS[:2])
        assert len(index.search("Rhine", k=10)) == 2


@pytest.mark.parametrize("k", [0, "3", 2.5, True])
def test_search_refuses_a_k_that_is_not_a_positive_integer(tmp_path: Path, k) -> None:
    # "3" and 2.5 reached FAISS, which failed without naming k; True would have been one hit
    with PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        with pytest.raises(ValueError, match=f"k must be an integer >= 1, got {k!r}"):
            index.search("Rhine", k=k)


# ---------------------------------------------------------------- the real embedder (loads MiniLM, ~5 s)


def test_default_embedder_end_to_end(tmp_path: Path) -> None:
    vectors = Embedder().encode(["a short sentence", "another one"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with PassageIndex.create(tmp_path) as index:
        index.add_passages(FACTS)
    with PassageIndex.open(tmp_path) as index:  # rebuilds the embedder from index.json
        hits = index.search("Which city is the capital of Australia?", k=2)
    assert hits[0].text == FACTS[2] and hits[0].score > hits[1].score


class _EmbedTogether(BagOfWordsEmbedder):
    """Holds each encode at a barrier while one is set: two adds both embed before either adds its vectors."""

    barrier: threading.Barrier | None = None

    def encode(self, texts, batch_size=64, show_progress=False):
        if self.barrier is not None:
            self.barrier.wait(timeout=10)
        return super().encode(texts, batch_size, show_progress)


def test_two_threads_adding_the_same_texts_add_each_vector_once_and_later_passages_stay_searchable(tmp_path):
    embedder = _EmbedTogether()
    index = PassageIndex.create(tmp_path / "index", embedder)
    embedder.barrier = threading.Barrier(2)
    failed: list[BaseException] = []

    def add() -> None:
        try:
            index.add_passages(["alpha beta gamma", "delta epsilon zeta"])
        except BaseException as error:  # a broken barrier would mean the race never ran
            failed.append(error)

    adds = [threading.Thread(target=add) for _ in range(2)]
    for thread in adds:
        thread.start()
    for thread in adds:
        thread.join()
    assert failed == []
    embedder.barrier = None
    # Two more records: with vectors added twice above, record and vector counts would now be equal and the new
    # passages would never be embedded.
    index.add_passages(["kappa lambda mu", "omicron pi rho"])
    hits = index.search("kappa lambda mu", k=4)
    assert sorted(h.text for h in hits) == sorted(
        ["alpha beta gamma", "delta epsilon zeta", "kappa lambda mu", "omicron pi rho"]
    )
    assert hits[0].text == "kappa lambda mu"
    index.close()
    reopened = PassageIndex.open(tmp_path / "index", BagOfWordsEmbedder())
    assert len({h.id for h in reopened.search("omicron pi rho", k=4)}) == 4


# ---------------------------------------------------------------- lost records are reported, never recreated


def _replace_records(directory: Path, content: bytes | None) -> None:
    """passages.sqlite replaced by ``content``, or (None) by fresh, empty records as a new index has."""
    (directory / "passages.sqlite").unlink()
    if content is None:
        PassageRecords(directory / "passages.sqlite").close()
    else:
        (directory / "passages.sqlite").write_bytes(content)


def _another_database(path: Path) -> bytes:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    return path.read_bytes()


@pytest.mark.parametrize("other", ["empty", "another-database"])
def test_open_and_repair_report_records_without_a_passages_table_as_lost_and_write_nothing(
    tmp_path: Path, other: str
) -> None:
    with PassageIndex.create(tmp_path / "index", embedder=BagOfWordsEmbedder()) as index:
        index.add_passages(FACTS)
    _replace_records(tmp_path / "index", b"" if other == "empty" else _another_database(tmp_path / "other.sqlite"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir() if p.is_file()}
    lost = r"passages.sqlite is unreadable \(it holds no passages table.*cannot be recovered.*ingest the source again"
    with pytest.raises(IndexIntegrityError, match=lost):
        PassageIndex.open(tmp_path / "index", embedder=BagOfWordsEmbedder())
    with pytest.raises(IndexIntegrityError, match=lost):
        PassageIndex.repair(tmp_path / "index", embedder=BagOfWordsEmbedder())
    assert {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir() if p.is_file()} == before


def test_repair_refuses_to_empty_vectors_that_hold_passages(tmp_path: Path) -> None:
    with PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        index.add_passages(FACTS)
    _replace_records(tmp_path, None)  # e.g. recreated by an older version opening a 0-byte file
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(
        IndexIntegrityError,
        match=r"passages.sqlite holds no passages but .*vectors.faiss holds 4: .*nothing was changed; the passage "
        "texts cannot be recovered",
    ):
        PassageIndex.repair(tmp_path, embedder=BagOfWordsEmbedder())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
