"""The OpenAI-compatible server on the tiny Llama: endpoints, passage KV reuse, errors, queueing, real clients."""

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
from conftest import PASSAGES, QUESTION
from fastapi.testclient import TestClient
from tiny import BagOfWordsEmbedder

from infoflow_rag.engine.decoding import GenerationConfig, generate_tokens, text_deltas
from infoflow_rag.engine.prefill import full_prefill
from infoflow_rag.engine.prompt import encode
from infoflow_rag.index.passage_index import PassageIndex
from infoflow_rag.pipeline import Pipeline
from infoflow_rag.serve import ServerSettings, create_app
from infoflow_rag.serve.loadtest import run_load, sequential_answers
from infoflow_rag.serve.run import loopback_socket, serve, server
from infoflow_rag.store import RedisKVStore, open_store

MODEL = "tiny-llama"
CONTEXT = "Context:\n" + "\n\n".join(PASSAGES[:2]) + f"\n\nQuestion: {QUESTION}"
STORY = [{"role": "user", "content": "Tell me a long story about the sea."}]  # no EOS for thousands of tokens


@pytest.fixture()
def pipeline(tmp_path, engine) -> Pipeline:
    index = PassageIndex.create(tmp_path / "index", embedder=BagOfWordsEmbedder())
    index.add_passages(PASSAGES, ["test"] * len(PASSAGES), [{} for _ in PASSAGES])
    return Pipeline(engine, open_store("memory"), index)


@pytest.fixture()
def client(pipeline) -> Iterator[TestClient]:
    with TestClient(create_app(pipeline, ServerSettings(model_name=MODEL, max_tokens=6))) as c:
        yield c


@contextmanager
def live_server(pipeline: Pipeline, **settings) -> Iterator[str]:
    """Serve ``pipeline`` with uvicorn on a free loopback port, in a thread; stopped on exit."""
    sock = loopback_socket()
    listening = threading.Event()  # set by the server once it accepts connections (the CLI's "serving ... on")
    srv = server(pipeline, ServerSettings(model_name=MODEL, **settings), on_listening=listening.set)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not listening.is_set():
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


def chat(client, messages=None, **fields) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages or [{"role": "user", "content": CONTEXT}], **fields},
    )


def events(response: httpx.Response) -> list:
    """The data of each server-sent event; "[DONE]" stays a string."""
    data = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def reference_answer(engine, rendered: str, max_new_tokens: int) -> str:
    """Plain greedy decoding of the whole rendered prompt: nothing cached, nothing selected."""
    out = full_prefill(engine.model, encode(engine.tokenizer, rendered))
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    tokens = generate_tokens(engine.model, out.cache, out.logits, out.next_position, gen, engine.eos_ids)
    return "".join(text_deltas(tokens, engine.tokenizer, ())).strip()


# --- endpoints and passage reuse ------------------------------------------------------------------------


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queued"] == 0 and health["model"] == MODEL


def test_second_request_reports_passage_tokens_from_the_store_as_cached(client, engine):
    first, second = chat(client).json(), chat(client).json()
    passage_tokens = sum(len(engine.tokenizer(p)["input_ids"]) for p in PASSAGES[:2])
    # The first request found both passages in the prompt and prefilled them: nothing came from the store.
    assert first["infoflow"]["passages_computed"] == 2 and first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["infoflow"]["passages_hit"] == 2
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == passage_tokens
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    stats = second["infoflow"]
    assert stats["selector"] == "sinkflow" and 0 < stats["recompute_fraction"] < 0.5  # the default
    assert stats["timings"]["prefill"] == 0 < first["infoflow"]["timings"]["prefill"]
    assert second["usage"]["completion_tokens"] == 6 and second["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "messages",
    [
        [
            {"role": "user", "content": CONTEXT},
            {"role": "assistant", "content": "Canberra."},
            {"role": "user", "content": "Sure?"},
        ],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": CONTEXT}],
    ],
    ids=["multi-turn", "system"],
)
def test_chat_is_the_model_chat_template_of_all_turns(client, engine, messages):
    """At 100 % recompute the served answer is plain decoding of the conversation as the chat template renders it."""
    rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    body = chat(client, messages, selector="full", max_tokens=12).json()
    assert body["usage"]["prompt_tokens"] == len(encode(engine.tokenizer, rendered))
    assert body["choices"][0]["message"]["content"] == reference_answer(engine, rendered, 12)
    cached = chat(client, messages, max_tokens=12).json()  # the passages inside the first user turn are found
    assert cached["infoflow"]["passages_computed"] + cached["infoflow"]["passages_hit"] == 2


def test_passages_sent_apart_and_retrieved_on_the_server(client, pipeline):
    body = chat(client, [{"role": "user", "content": QUESTION}], passages=[PASSAGES[0]], retrieve=1).json()
    [source] = body["infoflow"]["sources"]
    assert pipeline.index.get([source["id"]])[0].text == PASSAGES[2]  # bag of words: "capital", "Australia"
    assert body["infoflow"]["passages_computed"] == 2  # the one sent and the one retrieved
    again = client.post("/v1/completions", json={"model": MODEL, "prompt": QUESTION, "passages": [PASSAGES[2]]}).json()
    assert again["object"] == "text_completion" and again["infoflow"]["passages_hit"] == 1
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_query_options_per_request_override_server_defaults(client):
    body = chat(client, selector="epic", ratio=0.5, compress="snapkv", keep=0.5).json()["infoflow"]
    assert (body["selector"], body["ratio"], body["compress"], body["keep"]) == ("epic", 0.5, "snapkv", 0.5)
    assert body["kv_tokens"] < body["prompt_tokens"]  # compression evicted passage tokens


def test_streaming_chat_and_completion_match_the_whole_answer(client):
    whole = chat(client, max_tokens=10).json()
    streamed = events(chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert streamed[-1] == "[DONE]"
    *chunks, finish, usage = streamed[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == whole["choices"][0]["message"]["content"]
    assert finish["choices"][0]["finish_reason"] == "length" and finish["infoflow"]["selector"] == "sinkflow"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in chunks)

    plain = events(client.post("/v1/completions", json={"model": MODEL, "prompt": CONTEXT, "stream": True}))
    assert plain[-1] == "[DONE]" and all("usage" not in c for c in plain[:-1])
    assert all(c["object"] == "text_completion" for c in plain[:-1])


# --- refusals ---------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b'{"model": "tiny-llama", "messages": [', 400, ["malformed JSON"]),
        ({"model": MODEL}, 400, ["messages is required"]),
        ({"model": MODEL, "messages": []}, 400, ["messages"]),
        ({"model": "gpt-4o", "messages": USER}, 404, ["'gpt-4o'", "model='tiny-llama'"]),
        ({"model": MODEL, "messages": USER, "n": 3}, 400, ["n=3", "send n=1"]),
        ({"model": MODEL, "messages": USER, "max_tokens": -5}, 400, ["max_tokens must be >= 1, got -5"]),
        ({"model": MODEL, "messages": USER, "max_tokens": 5000}, 400, ["max_tokens=5000", "4096-token context"]),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 4100}]}, 400, ["4096-token context window"]),
        ({"model": MODEL, "messages": USER, "logprobs": True}, 400, ["logprobs=True", "omit logprobs"]),
        ({"model": MODEL, "messages": USER, "tools": [{"type": "function"}]}, 400, ["tools", "not supported"]),
        ({"model": MODEL, "messages": USER, "selector": "magic"}, 400, ["'magic'", "infoflow"]),
        ({"model": MODEL, "messages": USER, "keep": 0.5}, 400, ["keep=0.5", "compress"]),
        ({"model": MODEL, "messages": [*USER, {"role": "assistant", "content": "x"}]}, 400, ["last message"]),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, ["image_url"]),
        ({"model": MODEL, "messages": USER, "stop": ["end", ""]}, 400, ["stop strings must not be empty"]),
        ({"model": MODEL, "messages": USER, "seed": 2**70}, 400, ["seed must be an integer in [0, 2**63)"]),
        ({"model": MODEL, "messages": [{"role": "user", "content": " "}]}, 400, ["last user message is empty"]),
        # JSON escapes of lone surrogates: no encoding can write them, the tokenizer fails on them without saying where
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, ["lone surrogate"]),
        (
            b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "passages": ["a \\udfff b"]}',
            400,
            ["a passage is not valid text", "lone surrogate"],
        ),
    ],
    ids=lambda v: str(v)[:40] if not isinstance(v, list | int) else None,
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, body, status, words):
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    response = client.post("/v1/chat/completions", **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"]
    assert chat(client).status_code == 200


def test_an_empty_completion_prompt_is_refused(client):
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": [" \n"]})
    assert response.status_code == 400 and "prompt is empty; send the question" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("selector", "magic", "unknown selector 'magic'"),
        ("ratio", 5, "ratio must be in (0, 1], got 5.0"),
        ("selector_options", {"x": 1}, "x"),
        ("keep", 0.5, "keep=0.5 needs a compression policy"),
    ],
)
def test_a_bad_query_option_is_named_in_the_errors_param(client, option, value, words):
    error = chat(client, **{option: value}).json()["error"]
    assert (error["param"], error["code"]) == (option, "invalid_value") and words in error["message"]


@pytest.mark.parametrize(
    ("option", "value"),
    [("keep", True), ("ratio", True), ("ratio", "0.5"), ("reorder", "yes"), ("reorder", 1), ("retrieve", True)],
)
def test_query_options_of_another_json_type_are_refused_not_converted(client, option, value):
    # Converted, true would be keep=1 (one token), ratio=1.0 (a whole recompute); "0.5" a number sent as text
    response = chat(client, **{option: value}, **({"compress": "snapkv"} if option == "keep" else {}))
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"].split(".")[0] == option, error
    assert f"got {value!r}" in error["message"]


def test_ignores_unknown_fields_and_accepts_neutral_values_of_unsupported_ones(client):
    response = chat(client, user="u1", seed=3, top_p=0.9, logprobs=False, tool_choice="none", some_future_field=1)
    assert response.status_code == 200


def test_unreachable_kv_store_refuses_start_and_degrades_to_prefill_while_serving(engine):
    down = Pipeline(engine, RedisKVStore("redis://127.0.0.1:1/0"))  # nothing listens on port 1
    heard = []
    with pytest.raises(ValueError, match=r"redis://127.0.0.1:1/0.*pass another --store"):
        serve(down, ServerSettings(model_name=MODEL), on_listening=lambda: heard.append("listening"))
    assert heard == []  # the command line says "serving ... on" only once the server listens
    # A store that goes down while serving is a cache miss: answers go on, without reuse, and /health says why.
    with TestClient(create_app(down, ServerSettings(model_name=MODEL, max_tokens=4))) as c:
        for _ in range(2):
            body = chat(c, [{"role": "user", "content": QUESTION}], passages=[PASSAGES[0]]).json()
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            assert body["infoflow"]["passages_computed"] == 1
        health = c.get("/health").json()
        assert health["status"] == "degraded" and "redis://127.0.0.1:1/0" in health["store"]


def test_a_port_in_use_stops_the_server_before_it_says_it_listens(pipeline):
    heard = []
    with loopback_socket() as taken:
        taken.listen()
        port = taken.getsockname()[1]
        srv = server(pipeline, ServerSettings(model_name=MODEL), port=port, on_listening=lambda: heard.append(port))
        with pytest.raises(SystemExit):
            srv.run()
    assert heard == [] and not srv.started


# --- concurrency: queue bound, timeout, disconnect ------------------------------------------------------


def test_full_queue_is_429_with_retry_after(pipeline):
    release = threading.Event()
    answer = pipeline.stream_pieces

    def held(*args, **kwargs):
        release.wait(timeout=30)
        return answer(*args, **kwargs)

    pipeline.stream_pieces = held  # every request now waits for release inside the worker
    with live_server(pipeline, max_queue=1, max_tokens=2) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}]}
        pending = [threading.Thread(target=http.post, args=("/v1/chat/completions",), kwargs={"json": body})]
        pending[0].start()
        _wait_for(lambda: http.get("/health").json()["running"])
        pending.append(threading.Thread(target=http.post, args=("/v1/chat/completions",), kwargs={"json": body}))
        pending[1].start()
        _wait_for(lambda: http.get("/health").json()["queued"] == 1)
        refused = http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        release.set()
        for thread in pending:
            thread.join(timeout=30)
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        assert http.get("/health").json()["completed"] == 3


def test_timeout_is_504_and_stops_the_generation(pipeline):
    with live_server(pipeline, timeout=0.5) as url, httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": STORY, "max_tokens": 3000})
        assert response.status_code == 504 and "--timeout" in response.json()["error"]["message"]
        _wait_for(lambda: http.get("/health").json()["cancelled"] == 1)
        assert http.get("/health").json()["completed"] == 0


def test_client_disconnect_cancels_its_generation(pipeline):
    with live_server(pipeline) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = {"model": MODEL, "messages": STORY, "max_tokens": 3000, "stream": True}
        t = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            next(response.iter_lines())  # generation has started; now hang up
        _wait_for(lambda: http.get("/health").json()["cancelled"] == 1)
        health = http.get("/health").json()
        assert health["completed"] == 0 and not health["running"]
        assert time.monotonic() - t < 5  # 3000 tokens take ~8 s on the tiny model


def test_client_hanging_up_on_an_unstreamed_answer_cancels_its_generation(pipeline):
    # Its tokens came faster than the disconnect poll, which only ran when none came in time: the answer generated
    # to its end (~18 s for 400 tokens on SmolLM2) with the worker blocked for every queued request.
    with live_server(pipeline) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = {"model": MODEL, "messages": STORY, "max_tokens": 3000}
        t = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        _wait_for(lambda: http.get("/health").json()["cancelled"] == 1)
        health = http.get("/health").json()
        assert health["completed"] == 0 and not health["running"]
        assert time.monotonic() - t < 5  # 3000 tokens take ~8 s on the tiny model


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_load_8_clients_x_10_requests_get_the_sequential_greedy_answers(pipeline, capsys):
    """The issue's load test: bounded (80 requests), loopback only, every answer identical to the sequential one."""
    payloads = [
        {"model": MODEL, "max_tokens": 12, "messages": [{"role": "user", "content": q}], **extra}
        for q in (QUESTION, "Who won two Nobel prizes?", "Where does the Rhine rise?", "How does basalt form?")
        for extra in ({"retrieve": 2}, {"passages": PASSAGES[:2]})
    ]
    with live_server(pipeline) as url:
        expected = sequential_answers(url, payloads)
        report = run_load(url, payloads, expected, clients=8, per_client=10)
    with capsys.disabled():
        print(f"\nload test (tiny model, loopback): {report.summary()}")
    assert report.requests == 80 and report.errors == [] and report.mismatches == 0


# --- real clients -----------------------------------------------------------------------------------------


def test_official_openai_client_sync_async_and_streaming(pipeline):
    with live_server(pipeline, max_tokens=8) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        extra = {"passages": PASSAGES[:2]}
        messages = [{"role": "user", "content": QUESTION}]
        first = client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra)
        second = client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens > 0
        assert second.choices[0].message.content == first.choices[0].message.content
        assert second.model_extra["infoflow"]["passages_hit"] == 2

        stream = client.chat.completions.create(
            model=MODEL, messages=messages, extra_body=extra, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == (
            first.choices[0].message.content
        )
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0

        text = client.completions.create(model=MODEL, prompt=CONTEXT, max_tokens=4)
        assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 4

        with pytest.raises(openai.BadRequestError, match="n=2"):
            client.chat.completions.create(model=MODEL, messages=messages, n=2)
        with pytest.raises(openai.NotFoundError, match="model_not_found|not served"):
            client.chat.completions.create(model="gpt-4o", messages=messages)

        async def ask_async() -> str:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as aclient:
                answers = await asyncio.gather(
                    *(
                        aclient.chat.completions.create(model=MODEL, messages=messages, extra_body=extra)
                        for _ in range(3)
                    )
                )
            return {a.choices[0].message.content for a in answers}

        assert asyncio.run(ask_async()) == {first.choices[0].message.content}


def test_langchain_chat_openai_and_llamaindex_openai_like(pipeline):
    from langchain_openai import ChatOpenAI
    from llama_index.llms.openai_like import OpenAILike

    with live_server(pipeline, max_tokens=8) as url:
        reference = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": CONTEXT}]
        )
        expected = reference.choices[0].message.content

        lc = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key="unused", temperature=0, max_retries=0)
        message = lc.invoke(CONTEXT)
        assert message.content == expected
        assert message.usage_metadata["input_token_details"]["cache_read"] > 0
        assert "".join(chunk.content for chunk in lc.stream(CONTEXT)).strip() == expected

        li = OpenAILike(
            model=MODEL, api_base=f"{url}/v1", api_key="unused", is_chat_model=True, temperature=0, max_retries=0
        )
        assert li.complete(CONTEXT).text == expected
        li_text = OpenAILike(model=MODEL, api_base=f"{url}/v1", api_key="unused", is_chat_model=False, max_retries=0)
        assert li_text.complete(CONTEXT).raw.model_extra["infoflow"]["passages_hit"] == 2


@pytest.mark.redis
def test_two_server_processes_share_passage_kv_through_one_redis_store(redis_url, tmp_path, model_dir):
    """Scale out: `infoflow-rag serve` twice on one index and one Redis; what the first prefilled, the second reuses."""
    index = PassageIndex.create(tmp_path / "index")  # the bundled MiniLM embedder, as `infoflow-rag ingest` uses
    index.add_passages(PASSAGES, ["test"] * len(PASSAGES), [{} for _ in PASSAGES])
    index.close()
    ports = [_free_port(), _free_port()]
    logs = [open(tmp_path / f"server{i}.log", "w") for i in range(2)]  # closed below
    command = [sys.executable, "-m", "infoflow_rag.cli", "serve", "--index", str(tmp_path / "index")]
    command += ["--model", model_dir, "--store", redis_url, "--served-model-name", MODEL, "--max-tokens", "4"]
    servers = [
        subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        for port, log in zip(ports, logs, strict=True)
    ]
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "retrieve": 2}
    try:
        for port, proc in zip(ports, servers, strict=True):
            _wait_for(lambda port=port, proc=proc: _healthy(port, proc), timeout=120)
        a = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", json=body, timeout=60).json()
        b = httpx.post(f"http://127.0.0.1:{ports[1]}/v1/chat/completions", json=body, timeout=60).json()
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=30)
        for log in logs:
            log.close()
    assert a["infoflow"]["passages_computed"] == 2 and a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert b["infoflow"]["passages_hit"] == 2 and b["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]


def _free_port() -> int:
    with loopback_socket() as sock:
        return sock.getsockname()[1]


def _healthy(port: int, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, f"server on port {port} exited with {proc.returncode}"
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
