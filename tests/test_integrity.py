"""Integrity under concurrency, damage and bad input: every case of issue 11, one section per item of its list.

Each case must give the right answer or a clear one-line error, never a traceback, a wrong passage or a
wrong stored entry.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
from conftest import PASSAGES, QUESTION
from tiny import BagOfWordsEmbedder, tiny_model

from infoflow_rag import models
from infoflow_rag.cli import build_parser, main
from infoflow_rag.engine import Engine
from infoflow_rag.errors import IndexIntegrityError, StoreUnavailableError
from infoflow_rag.index.embedder import Embedder
from infoflow_rag.index.passage_index import META_FILE, RECORDS_FILE, VECTORS_FILE, PassageIndex
from infoflow_rag.index.splitting import load_source
from infoflow_rag.ingest import ingest
from infoflow_rag.kv import PassageKV
from infoflow_rag.pipeline import Pipeline
from infoflow_rag.store import DiskKVStore, RedisKVStore, open_store

# Passages of different lengths, so a recorder fed by another thread's forward fails or stores wrong values.
THREAD_PASSAGES = [f"Passage {i}: " + "the river bends and " * (i + 1) + "reaches the sea." for i in range(8)]
OTHER_TEXTS = ["Registered one: the kiln fires at 1200 degrees.", "Registered two: owls hunt mostly at night."]


@pytest.fixture()
def indexed(tmp_path, engine) -> Pipeline:
    """PASSAGES indexed (ids 1..4) with an in-memory KV store."""
    index = PassageIndex.create(tmp_path / "index", embedder=BagOfWordsEmbedder())
    index.add_passages(PASSAGES)
    return Pipeline(engine, open_store("memory"), index)


def dropped_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dropping corrupt KV entry" in r.getMessage()]


# --- 1. thread-safe engine use ------------------------------------------------------------------------


def test_1_eight_threads_asking_with_missing_kv_store_the_sequential_signals(engine):
    pipeline = Pipeline(engine, open_store("memory"))
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(THREAD_PASSAGES))

    def ask(text: str) -> None:
        try:
            barrier.wait()
            pipeline.stream_passages(QUESTION, [text], max_new_tokens=2).finish()
        except BaseException as e:  # noqa: BLE001 - collected and reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(text,)) for text in THREAD_PASSAGES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = pipeline.store.get_many([pipeline.key(engine.passage_ids(t)) for t in THREAD_PASSAGES])
    for text, kv in zip(THREAD_PASSAGES, stored, strict=True):
        (alone,) = engine.prefill([text])  # sequential reference, same batch of one
        assert kv is not None and set(kv.signals) == {"entropy", "evolution"}
        for name in kv.signals:
            assert torch.equal(kv.signals[name], alone.signals[name]), name
        assert torch.equal(kv.keys, alone.keys) and torch.equal(kv.values, alone.values)


# --- 2. one id space for indexed and registered passages ---------------------------------------------


def test_2_registered_passages_never_take_an_indexed_passages_id(indexed, engine):
    indexed.register(OTHER_TEXTS)
    prompt = "Context:\n" + "\n\n".join([PASSAGES[0], *OTHER_TEXTS, PASSAGES[1]]) + f"\n\nQuestion: {QUESTION}"
    answer = indexed.answer_prompt(prompt, max_new_tokens=2)
    served = [engine.tokenizer.decode(ids) for _, ids in sorted(answer.result.passage_tokens.items())]
    assert served == [PASSAGES[0], *OTHER_TEXTS, PASSAGES[1]]  # each passage answered from its own KV
    assert answer.reuse.passages_hit == 2  # the registered texts were stored by register


# --- 3. index integrity --------------------------------------------------------------------------------


def build_index(directory: Path, texts: list[str] = PASSAGES) -> None:
    with PassageIndex.create(directory, embedder=BagOfWordsEmbedder()) as index:
        index.add_passages(texts)


def test_3_recreated_records_next_to_old_vectors_are_refused(tmp_path):
    build_index(tmp_path / "a")
    build_index(tmp_path / "b", list(reversed(PASSAGES)))  # same ids, other texts
    shutil.copyfile(tmp_path / "b" / RECORDS_FILE, tmp_path / "a" / RECORDS_FILE)
    with pytest.raises(IndexIntegrityError, match="belongs to another index.*infoflow-rag index repair"):
        PassageIndex.open(tmp_path / "a", embedder=BagOfWordsEmbedder())


def test_3_vectors_of_another_index_are_refused(tmp_path):
    build_index(tmp_path / "a")
    build_index(tmp_path / "b")
    shutil.copyfile(tmp_path / "b" / VECTORS_FILE, tmp_path / "a" / VECTORS_FILE)
    with pytest.raises(IndexIntegrityError, match=f"{VECTORS_FILE} belongs to another index"):
        PassageIndex.open(tmp_path / "a", embedder=BagOfWordsEmbedder())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / VECTORS_FILE).unlink(), f"{VECTORS_FILE} is missing.*index repair"),
        (lambda d: (d / VECTORS_FILE).write_bytes(b"not faiss at all"), "not a readable FAISS index.*index repair"),
        (lambda d: (d / META_FILE).unlink(), f"{META_FILE} is missing.*index repair"),
        (lambda d: (d / META_FILE).write_text("{ truncated"), "unreadable or of an unknown format.*index repair"),
        (lambda d: (d / RECORDS_FILE).unlink(), f"{RECORDS_FILE} is missing.*ingest the source again"),
        (lambda d: (d / RECORDS_FILE).write_bytes(b"garbage" * 1000), "unreadable.*ingest the source again"),
    ],
    ids=["vectors-missing", "vectors-corrupt", "meta-missing", "meta-corrupt", "records-missing", "records-corrupt"],
)
def test_3_missing_or_corrupt_index_file_is_a_clear_error(tmp_path, damage, message):
    build_index(tmp_path)
    for name in ("-wal", "-shm"):  # the records' WAL side files would otherwise revive a replaced database
        Path(f"{tmp_path / RECORDS_FILE}{name}").unlink(missing_ok=True)
    damage(tmp_path)
    with pytest.raises(IndexIntegrityError, match=message):
        PassageIndex.open(tmp_path, embedder=BagOfWordsEmbedder())


@pytest.mark.parametrize("lost", [VECTORS_FILE, META_FILE])
def test_3_repair_rebuilds_a_working_index_from_the_records(tmp_path, lost):
    build_index(tmp_path)
    (tmp_path / lost).unlink()
    with PassageIndex.repair(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        assert len(index) == len(PASSAGES)
    with PassageIndex.open(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        assert index.search(QUESTION, k=1)[0].text == PASSAGES[2]


@pytest.mark.parametrize("lost", [VECTORS_FILE, META_FILE])
def test_3_cli_reports_a_broken_index_in_one_line_and_repairs_it(tmp_path, capsys, lost):
    with PassageIndex.create(tmp_path, embedder=Embedder()) as index:  # the CLI loads the embedder by name
        index.add_passages(PASSAGES)
    (tmp_path / lost).unlink()
    capsys.readouterr()  # the embedder's loading bar
    for command in (["ask", QUESTION, "--index", str(tmp_path)], ["ingest", str(tmp_path), "--index", str(tmp_path)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{lost} is missing" in err
        assert f"infoflow-rag index repair {tmp_path}" in err
    assert main(["index", "repair", str(tmp_path)]) == 0
    assert f"rebuilt the vectors of {len(PASSAGES)} passages" in capsys.readouterr().out
    with PassageIndex.open(tmp_path) as index:
        assert index.search("Which city is the capital of Australia?", k=1)[0].text == PASSAGES[2]


def test_3_opening_an_index_deletes_the_temp_files_of_writes_killed_midway(tmp_path):
    with PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        index.add_passages(PASSAGES)
    stale, fresh = tmp_path / f".{VECTORS_FILE}.dead.tmp", tmp_path / f".{VECTORS_FILE}.writing.tmp"
    for temp in (stale, fresh):
        temp.write_bytes(b"x" * 100)
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    with PassageIndex.open(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        assert not stale.exists() and fresh.exists() and len(index) == len(PASSAGES)


class SlowToLoadEmbedder(BagOfWordsEmbedder):
    """Takes a while to give its dimension, as the real one takes to load: two creates meet in between."""

    @property
    def dim(self) -> int:
        time.sleep(0.3)
        return 64


def test_3_two_creates_at_once_make_one_index(tmp_path):
    # Each passed the no-index check before the other wrote index.json and stamped an identity of its own: both
    # reported success, and the files were left disagreeing ("vectors.faiss belongs to another index").
    outcomes: list[object] = []

    def create() -> None:
        try:
            PassageIndex.create(tmp_path, embedder=SlowToLoadEmbedder()).close()
            outcomes.append("created")
        except FileExistsError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("created") == 1 and [type(o) for o in outcomes if o != "created"] == [FileExistsError]
    with PassageIndex.open(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        assert len(index) == 0


def test_3_two_pipelines_creating_one_index_at_once_both_serve_it(tmp_path, engine):
    # Two ingests into a new directory: the one that finds the index made meanwhile opens it.
    pipelines: list[Pipeline] = []

    def open_and_add(texts: list[str]) -> None:
        pipeline = Pipeline.open(tmp_path, model=engine, create=True, embedder=SlowToLoadEmbedder())
        pipeline.index.add_passages(texts)
        pipelines.append(pipeline)

    threads = [threading.Thread(target=open_and_add, args=(half,)) for half in (PASSAGES[:2], PASSAGES[2:])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(pipelines) == 2
    for pipeline in pipelines:
        pipeline.close()
    with PassageIndex.open(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        assert sorted(r.text for r in index) == sorted(PASSAGES)


# --- 4. cache keys cover the weights; stored KV checked against the passage ---------------------------


def test_4_weights_changed_in_place_change_the_fingerprint(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("INFOFLOW_RAG_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "model"
    shutil.copytree(model_dir, directory)
    before = Engine(str(directory)).fingerprint
    assert list((tmp_path / "cache" / "weights").glob("*.sha256"))  # hashed once, then cached
    with monkeypatch.context() as m:
        m.setattr(models, "file_sha256", lambda path: pytest.fail("unchanged weights were hashed again"))
        assert Engine(str(directory)).fingerprint == before
    tiny_model("llama", seed=1).model.save_pretrained(directory)  # same config and name, other weights
    assert Engine(str(directory)).fingerprint != before


def test_4_models_built_in_code_are_told_apart_by_their_weights(engine):
    assert (
        Engine(tiny_model("llama", seed=1), lead_in=None).fingerprint != engine.fingerprint
    )  # only the weights differ


def _wrong_shapes(kv: PassageKV, other: PassageKV) -> PassageKV:
    return PassageKV(kv.token_ids, kv.keys[:1], kv.values[:1], kv.offset, kv.signals)


def _wrong_offset(kv: PassageKV, other: PassageKV) -> PassageKV:
    return PassageKV(kv.token_ids, kv.keys, kv.values, kv.offset + 1, kv.signals)


def _other_text(kv: PassageKV, other: PassageKV) -> PassageKV:
    return other


def _no_signals(kv: PassageKV, other: PassageKV) -> PassageKV:
    return PassageKV(kv.token_ids, kv.keys, kv.values, kv.offset)


@pytest.mark.parametrize("bad", [_wrong_shapes, _wrong_offset, _other_text, _no_signals])
def test_4_a_stored_kv_that_is_not_the_passages_is_dropped_recomputed_and_reported_once(engine, bad, caplog):
    pipeline = Pipeline(engine, open_store("memory"))
    right, other = engine.prefill(PASSAGES[:2])
    key = pipeline.key(right.token_ids)
    pipeline.store.put(key, bad(right, other))  # a valid checksum over the wrong content
    with caplog.at_level(logging.WARNING):
        first = pipeline.kv_for(PASSAGES[:1])
        second = pipeline.kv_for(PASSAGES[:1])
    assert first.fresh == [True] and second.fresh == [False]
    assert torch.equal(first.kvs[0].keys, right.keys) and torch.equal(second.kvs[0].keys, right.keys)
    assert len(dropped_warnings(caplog)) == 1 and pipeline.store.stats.corrupt == 1


def _with_header(data: bytes, edit) -> bytes:
    (length,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def test_4_a_malformed_header_is_dropped_not_a_crash_on_every_ask(tmp_path, engine, caplog):
    pipeline = Pipeline(engine, DiskKVStore(tmp_path / "kv"))
    pipeline.kv_for(PASSAGES[:1])
    path = pipeline.store.path_for(pipeline.key(engine.passage_ids(PASSAGES[0])))
    path.write_bytes(_with_header(path.read_bytes(), lambda h: h.update(__metadata__=["a", "list"])))
    with caplog.at_level(logging.WARNING):
        answers = [pipeline.stream_passages(QUESTION, PASSAGES[:1], max_new_tokens=2).finish() for _ in range(2)]
    assert [a.reuse.passages_computed for a in answers] == [1, 0]  # dropped once, recomputed, then served
    assert len(dropped_warnings(caplog)) == 1


# --- 5. validate before saving ---------------------------------------------------------------------------


def test_5_an_oversized_passage_is_split_before_anything_is_written(tmp_path, engine):
    long_text = " ".join(f"w{i}" for i in range(1500))  # one sentence of 7,390 byte tokens: over 4,096 positions
    source = tmp_path / "docs"
    source.mkdir()
    (source / "long.txt").write_text(long_text)
    (source / "short.txt").write_text(PASSAGES[2])
    pipeline = Pipeline(engine, open_store("memory"), PassageIndex.create(tmp_path / "i", BagOfWordsEmbedder()))
    summary = ingest(pipeline, source, progress=False)
    assert summary.passages == summary.new_passages == summary.kv_computed > 2
    assert all(len(engine.passage_ids(r.text)) + len(engine.prefix) <= engine.max_positions for r in pipeline.index)
    assert pipeline.ask(QUESTION, top_k=3, max_new_tokens=2).sources[0].text == PASSAGES[2]
    assert ingest(pipeline, source, progress=False).new_passages == 0  # a re-run gets past it


def test_5_top_k_is_bounded_by_the_index_size(indexed):
    assert len(indexed.retrieve(QUESTION, top_k=2_000_000_000)) == len(PASSAGES)


COUNT_FLAGS = [
    (["ingest", "src", "--index", "i"], "--batch-size"),
    (["ask", "q", "--index", "i"], "--top-k"),
    (["eval", "run"], "--limit"),
    (["bench", "ttft"], "--repeats"),
    (["bench", "prefill"], "--repeats"),
    (["bench", "store"], "--passages"),
    (["ask", "q", "--index", "i"], "--max-new-tokens"),
    (["eval", "run"], "--max-new-tokens"),
    (["eval", "run"], "--chunk-tokens"),
    (["eval", "report"], "--main-n"),
    (["serve", "--index", "i"], "--max-tokens"),
    (["serve", "--index", "i"], "--max-queue"),
]


@pytest.mark.parametrize(("command", "flag"), COUNT_FLAGS)
@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_5_counts_below_one_are_refused_by_the_cli(command, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, flag, value])
    assert exit_info.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err


def test_5_batch_size_below_one_is_refused_by_ingest(indexed, tmp_path):
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        ingest(indexed, tmp_path, batch_size=0, progress=False)


def test_5_non_utf8_files_are_named_and_skipped_or_refused(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    with caplog.at_level(logging.WARNING):
        assert [d.id for d in load_source(tmp_path)] == ["good.txt"]
    assert "bad.txt is not UTF-8" in caplog.text
    with pytest.raises(ValueError, match="bad.txt is not UTF-8"):
        load_source(tmp_path, strict_utf8=True)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with caplog.at_level(logging.WARNING):
        assert [d.text for d in load_source(jsonl)] == ["ok"]
    assert "data.jsonl:2 is not UTF-8" in caplog.text


def test_5_symlinks_leaving_the_source_folder_are_not_followed_unless_asked(tmp_path, caplog):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not for the index")
    source = tmp_path / "source"
    source.mkdir()
    (source / "doc.txt").write_text("indexed")
    (source / "link.txt").symlink_to(secret)
    (source / "inside.txt").symlink_to(source / "doc.txt")  # a link that stays inside is fine
    (source / "linked").symlink_to(secret.parent, target_is_directory=True)  # a folder outside
    (source / "loop").symlink_to(source, target_is_directory=True)  # walked once, not forever
    with caplog.at_level(logging.WARNING):
        assert [d.id for d in load_source(source)] == ["doc.txt", "inside.txt"]
    assert "link.txt: it links to" in caplog.text and "linked: it links to" in caplog.text
    followed = [d.id for d in load_source(source, follow_symlinks=True)]
    assert followed == ["doc.txt", "inside.txt", "link.txt", "linked/secret.txt"]


# --- 6. the store is a cache ---------------------------------------------------------------------------


def _failing(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV store ")]


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC], ids=["read-only", "disk-full"])
def test_6_a_failed_disk_write_is_reported_once_and_the_answer_served(tmp_path, engine, monkeypatch, caplog, code):
    pipeline = Pipeline(engine, DiskKVStore(tmp_path / "kv"))
    monkeypatch.setattr("infoflow_rag.store.disk.atomic_write", _failing(code))
    with caplog.at_level(logging.WARNING):
        answers = [pipeline.stream_passages(QUESTION, [text], max_new_tokens=2).finish() for text in PASSAGES[:2]]
    assert all(a.answer is not None and a.reuse.passages_computed == 1 for a in answers)
    assert store_warnings(caplog) == [store_warnings(caplog)[0]] and "write failed" in store_warnings(caplog)[0]
    assert os.strerror(code) in store_warnings(caplog)[0]


def test_6_a_failed_disk_read_is_a_miss(tmp_path, engine, monkeypatch, caplog):
    pipeline = Pipeline(engine, DiskKVStore(tmp_path / "kv"))
    pipeline.kv_for(PASSAGES[:1])
    monkeypatch.setattr("infoflow_rag.store.disk.unpack_file", _failing(errno.EIO))
    with caplog.at_level(logging.WARNING):
        lookups = [pipeline.kv_for(PASSAGES[:1]) for _ in range(2)]
    assert [lookup.fresh for lookup in lookups] == [[True], [True]]
    assert len(store_warnings(caplog)) == 1 and "could not read an entry" in store_warnings(caplog)[0]


def test_6_an_unreadable_disk_entry_costs_only_its_own_reuse(tmp_path, engine):
    store = DiskKVStore(tmp_path / "kv")
    pipeline = Pipeline(engine, store)
    pipeline.kv_for(PASSAGES[:3])
    keys = [pipeline.key(engine.passage_ids(text)) for text in PASSAGES[:3]]
    store.path_for(keys[1]).unlink()
    store.path_for(keys[1]).mkdir()  # a directory where its file was: reading and writing it fail with OS errors
    for _ in range(2):  # the others are still read
        assert pipeline.kv_for(PASSAGES[:3]).fresh == [False, True, False]
    store.delete(keys[2])
    with pytest.raises(StoreUnavailableError):  # the failed write is still said, after the one behind it was written
        store.put_many(zip([keys[1], keys[2]], engine.prefill(PASSAGES[1:3]), strict=True))
    assert store.path_for(keys[2]).is_file()


def test_6_redis_down_is_a_miss_and_a_skipped_write(engine, caplog):
    port = 1  # nothing listens there
    pipeline = Pipeline(engine, RedisKVStore(f"redis://127.0.0.1:{port}/0"))
    with caplog.at_level(logging.WARNING):
        answers = [pipeline.stream_passages(QUESTION, PASSAGES[:2], max_new_tokens=2).finish() for _ in range(2)]
    assert [a.reuse.passages_computed for a in answers] == [2, 2]
    assert sorted(m.split()[2] for m in store_warnings(caplog)) == ["read", "write"]


@pytest.mark.redis
def test_6_redis_out_of_memory_is_a_skipped_write(redis_url, engine, caplog):
    client = redis.Redis.from_url(redis_url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    try:
        pipeline = Pipeline(engine, RedisKVStore(redis_url))
        with caplog.at_level(logging.WARNING):
            answer = pipeline.stream_passages(QUESTION, PASSAGES[:2], max_new_tokens=2).finish()
    finally:
        client.config_set("maxmemory", "0")
    assert answer.reuse.passages_computed == 2
    assert len(store_warnings(caplog)) == 1 and "maxmemory" in store_warnings(caplog)[0]


@pytest.mark.redis
def test_6_redis_wrongtype_is_a_miss_then_overwritten(redis_url, engine, caplog):
    store = RedisKVStore(redis_url)
    pipeline = Pipeline(engine, store)
    key = pipeline.key(engine.passage_ids(PASSAGES[0]))
    redis.Redis.from_url(redis_url).rpush(store.redis_key(key), "not a KV entry")
    with caplog.at_level(logging.WARNING):
        first = pipeline.stream_passages(QUESTION, PASSAGES[:1], max_new_tokens=2).finish()
    assert first.reuse.passages_computed == 1 and "WRONGTYPE" in store_warnings(caplog)[0]
    assert pipeline.stream_passages(QUESTION, PASSAGES[:1], max_new_tokens=2).finish().reuse.passages_hit == 1


# --- 7. truthful stats ---------------------------------------------------------------------------------


def test_7_reused_share_is_zero_without_hits(indexed):
    first = indexed.ask(QUESTION, top_k=2, max_new_tokens=2)
    assert first.reuse.passages_hit == 0 and first.reuse.reused_share == 0
    second = indexed.ask(QUESTION, top_k=2, max_new_tokens=2)
    assert second.reuse.passages_hit == 2 and 0 < second.reuse.reused_share < 1


def test_7_a_passage_that_comes_twice_in_one_batch_is_prefilled_once(tmp_path, engine, monkeypatch):
    # Boilerplate repeated across the files of one ingest batch was prefilled and written once per copy.
    source = tmp_path / "docs"
    source.mkdir()
    for name, text in (("a.txt", PASSAGES[0]), ("b.txt", PASSAGES[1]), ("c.txt", PASSAGES[0])):
        (source / name).write_text(text)
    pipeline = Pipeline(engine, open_store("memory"), PassageIndex.create(tmp_path / "index", BagOfWordsEmbedder()))
    prefilled: list[str] = []
    prefill = type(engine).prefill
    monkeypatch.setattr(
        type(engine), "prefill", lambda self, texts, **k: prefilled.extend(texts) or prefill(self, texts, **k)
    )
    summary = ingest(pipeline, source, progress=False)
    assert sorted(prefilled) == sorted(PASSAGES[:2]) and summary.kv_computed == 2
    assert summary.tokens == sum(len(engine.passage_ids(t)) for t in PASSAGES[:2])
    lookup = pipeline.kv_for([PASSAGES[2], PASSAGES[2]])  # the same in a query's passages
    assert lookup.fresh == [True, False] and lookup.kvs[0] is lookup.kvs[1] and prefilled[2:] == [PASSAGES[2]]


def test_7_ingest_counts_only_its_own_new_passages_while_another_writer_adds(tmp_path, engine, monkeypatch):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES))
    index_dir = tmp_path / "index"
    pipeline = Pipeline(engine, open_store("memory"), PassageIndex.create(index_dir, BagOfWordsEmbedder()))
    kv_for = pipeline.kv_for

    def with_another_writer(texts, **kwargs):
        with PassageIndex.open(index_dir, BagOfWordsEmbedder()) as other:  # e.g. a second ingest process
            other.add_passages([f"{t} (other writer)" for t in texts])
        return kv_for(texts, **kwargs)

    monkeypatch.setattr(pipeline, "kv_for", with_another_writer)
    summary = ingest(pipeline, source, batch_size=2, progress=False)
    assert summary.new_passages == len(PASSAGES) and len(pipeline.index) == 2 * len(PASSAGES)
