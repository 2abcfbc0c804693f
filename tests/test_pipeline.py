"""Retriever + KV store + engine wired together; ingest that survives kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import PASSAGES, QUESTION, write_corpus
from tiny import BagOfWordsEmbedder

from infoflow_rag.engine import Engine
from infoflow_rag.index.passage_index import PassageIndex
from infoflow_rag.pipeline import Pipeline
from infoflow_rag.store import DiskKVStore, open_store


@pytest.fixture()
def pipeline(tmp_path, engine) -> Pipeline:
    index = PassageIndex.create(tmp_path / "index", embedder=BagOfWordsEmbedder())
    index.add_passages(PASSAGES, ["test"] * len(PASSAGES), [{} for _ in PASSAGES])
    return Pipeline(engine, open_store("memory"), index)


def test_ask_retrieves_loads_and_reports_stages(pipeline):
    first = pipeline.ask(QUESTION, top_k=2, max_new_tokens=4)
    assert [h.text for h in first.sources][0] == PASSAGES[2]  # bag of words: shares "capital", "Australia"
    assert (first.reuse.passages_hit, first.reuse.passages_computed) == (0, 2)
    second = pipeline.ask(QUESTION, top_k=2, max_new_tokens=4)
    assert (second.reuse.passages_hit, second.reuse.passages_computed) == (2, 0)  # served from the store now
    assert second.answer == first.answer
    t = second.result.timings
    assert t.retrieve > 0 and t.load_kv > 0 and t.prefill == 0
    assert t.ttft >= t.retrieve + t.load_kv + t.recompute


def test_a_question_no_encoding_can_write_is_refused_by_name(pipeline):
    # A command-line byte that is not UTF-8 arrives as a lone surrogate (Python's surrogateescape).
    question = b"Who founded caf\xe9?".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="the question is not valid text: character 15 is a lone surrogate"):
        pipeline.ask(question, top_k=2, max_new_tokens=4)


def test_asking_an_empty_index_says_the_index_is_empty(tmp_path, engine):
    index = PassageIndex.create(tmp_path / "empty", embedder=BagOfWordsEmbedder())
    empty = Pipeline(engine, open_store("memory"), index)
    with pytest.raises(ValueError, match=f"the index at {tmp_path / 'empty'} holds no passages; add some first"):
        empty.ask(QUESTION, max_new_tokens=2)


def test_stored_kv_is_the_prefilled_kv(pipeline):
    lookup = pipeline.kv_for(PASSAGES[:2])
    again = pipeline.kv_for(PASSAGES[:2])
    assert again.hits == 2
    for a, b in zip(lookup.kvs, again.kvs, strict=True):
        assert (a.keys == b.keys).all() and (a.values == b.values).all()


def test_prompt_with_known_passages_reuses_them(engine):
    cached = Pipeline(engine, open_store("memory"))
    cached.register(PASSAGES)
    prompt = "Context information is below.\n---\n" + "\n\n".join(PASSAGES) + f"\n---\nQuery: {QUESTION}\nAnswer: "
    reuse = cached.answer_prompt(prompt, max_new_tokens=6)
    assert reuse.reuse.passages_hit == len(PASSAGES) and reuse.reuse.reused_share > 0.5
    # 100 % recompute through the cached path answers exactly as the plain uncached prompt does.
    full = cached.answer_prompt(prompt, selector="full", max_new_tokens=6)
    plain = Pipeline(engine, open_store("memory")).answer_prompt(prompt, max_new_tokens=6)
    assert plain.reuse.passages_hit == 0 and plain.reuse.reused_share == 0
    assert full.answer == plain.answer


def test_kill_9_during_ingest_then_rerun_gives_a_complete_consistent_index(tmp_path, model_dir):
    corpus = tmp_path / "corpus.jsonl"
    texts = [f"Document {i} talks about topic {i % 17} and item {i * 7 % 101} in some detail." for i in range(400)]
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    index_dir = tmp_path / "index"
    cmd = [
        sys.executable,
        "-m",
        "infoflow_rag.cli",
        "ingest",
        str(corpus),
        "--index",
        str(index_dir),
        "--model",
        str(model_dir),
        "--batch-size",
        "8",
        "--json",
    ]
    env = {**os.environ, "INFOFLOW_RAG_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kv_dir = index_dir / "kv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if kv_dir.exists() and sum(1 for _ in kv_dir.rglob("*.safetensors")) >= 40:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed: make the corpus larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored_before = sum(1 for _ in kv_dir.rglob("*.safetensors"))
    assert 0 < stored_before < len(texts)

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["passages"] == len(texts)
    assert summary["kv_computed"] == len(texts) - stored_before  # resumed: nothing redone

    engine = Engine.load(str(model_dir))
    with Pipeline.open(index_dir, model=engine) as pipeline:
        assert len(pipeline.index) == len(texts)
        assert sorted(h.text for h in pipeline.index.search(texts[5], k=1)) == [texts[5]]
        store = pipeline.store
        assert isinstance(store, DiskKVStore)
        keys = [pipeline.key(engine.passage_ids(t)) for t in texts]
        assert all(kv is not None for kv in store.get_many(keys))
        assert store.stats.corrupt == 0


def test_cli_ingest_ask_and_check_in_process(tmp_path, model_dir, capsys, monkeypatch):
    from infoflow_rag.cli import main

    monkeypatch.setenv("INFOFLOW_RAG_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path)
    index = str(tmp_path / "index")
    assert (
        main(
            [
                "ingest",
                str(corpus),
                "--index",
                index,
                "--model",
                str(model_dir),
                "--kv-dtype",
                "float16",
                "--index-kind",
                "hnsw",
                "--index-param",
                "M=8",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["passages"] == summary["kv_computed"] == len(PASSAGES)
    assert (
        main(
            [
                "ask",
                QUESTION,
                "--index",
                index,
                "--model",
                str(model_dir),
                "--top-k",
                "2",
                "--max-new-tokens",
                "4",
                "--json",
            ]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["sources"]) == 2 and answer["result"]["timings"]["load_kv"] > 0
    assert main(["check", "--model", str(model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["ask", QUESTION, "--index", str(tmp_path / "missing"), "--model", str(model_dir)]) == 2
    assert "no passage index" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "ttft", "--context", "2k"], "--context takes comma-separated token counts"),
        (["demo", "--items", "2", "--questions", "3"], "1 <= --questions <= --items"),
        (["ask", "q", "--index", "nowhere"], "no passage index in nowhere"),
    ],
)
def test_cli_names_bad_values_before_loading_anything(argv, message, capsys):
    from infoflow_rag.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_open_refuses_a_bad_store_before_anything_opens_and_closes_what_it_opened_when_the_model_fails(
    tmp_path, monkeypatch
):
    def no_model(*args, **kwargs):
        raise RuntimeError("the model failed to load")

    monkeypatch.setattr(Engine, "load", no_model)
    with pytest.raises(ValueError, match="unknown KV store spec 'kv'; accepted forms"):
        Pipeline.open(tmp_path / "new", store="kv", create=True)
    assert not (tmp_path / "new").exists()  # refused before the index was made
    index_dir = tmp_path / "index"
    PassageIndex.create(index_dir).close()
    closed = []
    monkeypatch.setattr(PassageIndex, "close", lambda self: closed.append("index"))
    monkeypatch.setattr(DiskKVStore, "close", lambda self: closed.append("store"))
    with pytest.raises(RuntimeError, match="the model failed to load"):
        Pipeline.open(index_dir)
    assert sorted(closed) == ["index", "store"]


def test_open_passes_a_given_embedder_to_an_existing_index_and_checks_only_the_index_shape(tmp_path, engine):
    with Pipeline.open(tmp_path, model=engine, create=True, embedder=BagOfWordsEmbedder()) as pipeline:
        pipeline.index.add_passages(PASSAGES)
    with Pipeline.open(tmp_path, model=engine, create=True, embedder=BagOfWordsEmbedder()) as pipeline:
        assert pipeline.index.search(QUESTION, k=1)[0].text == PASSAGES[2]


def test_open_to_create_finishes_a_create_killed_before_index_json_unless_it_stored_passages(tmp_path, engine):
    from infoflow_rag.errors import IndexIntegrityError
    from infoflow_rag.index.passage_index import RECORDS_FILE
    from infoflow_rag.index.records import PassageRecords

    empty, holding = tmp_path / "empty", tmp_path / "holding"
    for directory in (empty, holding):
        directory.mkdir()
        with PassageRecords(directory / RECORDS_FILE) as records:  # killed before index.json was written
            if directory == holding:
                records.add_many(PASSAGES[:1])
    with Pipeline.open(empty, model=engine, create=True) as pipeline:
        assert len(pipeline.index) == 0
    with pytest.raises(IndexIntegrityError, match="index.json is missing, though passages.sqlite holds 1 passages"):
        Pipeline.open(holding, model=engine, create=True)
    with pytest.raises(IndexIntegrityError, match="index.json is missing"):
        Pipeline.open(holding, model=engine)
