import asyncio
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import their helpers (tiny.py) by module name

from tiny import FAMILIES, tiny_model  # noqa: E402

from infoflow_rag.engine import Engine  # noqa: E402

PASSAGES = [
    "The Rhine rises in the Swiss Alps and flows to the North Sea.",
    "Marie Curie won two Nobel prizes, in physics and in chemistry.",
    "The capital of Australia is Canberra, not Sydney.",
    "Basalt forms when lava cools quickly at the surface.",
]
QUESTION = "What is the capital of Australia?"


# The engine fixtures prefill passages right behind the prompt head (lead_in=None), the published setup whose
# mechanics most tests pin (the first passage's cache exact, budgets over the passages after it). The default lead-in
# is tested on its own (test_lead_in.py) and reaches every test that loads a model by name or path (model_dir).


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family_engine(request) -> Engine:
    return Engine.load(tiny_model(request.param), lead_in=None)


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine.load(tiny_model("llama"), lead_in=None)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """The tiny Llama saved as a Hugging Face directory, for commands that load a model by path."""
    path = tmp_path_factory.mktemp("model")
    loaded = tiny_model("llama")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a throwaway redis-server on a free local port."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH; install it (apt-get install redis-server) to run these")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path_factory.mktemp("redis"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    redis.Redis.from_url(redis_server).flushdb()
    return redis_server


def record_prompts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The whole prompt of every ``Pipeline.stream_pieces`` call from now on: head, pieces (passages as their
    text) and tail of the pipeline answering, as the model reads it."""
    from infoflow_rag.pipeline import Pipeline

    prompts: list[str] = []
    original = Pipeline.stream_pieces

    def spy(self: Pipeline, pieces, *args, **kwargs):
        body = "".join(p if isinstance(p, str) else p.text for p in pieces)
        prompts.append(self.engine.format.head + body + self.engine.format.tail)
        return original(self, pieces, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "stream_pieces", spy)
    return prompts


def chat_template(engine: Engine, turns: list[tuple[str, str]]) -> str:
    """``(role, content)`` turns as the model's chat template renders them, up to the assistant header."""
    messages = [{"role": role, "content": content} for role, content in turns]
    return engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


TICK_S = 0.02
# Answer length for calls timed against the ticker: long enough (~0.5 s on the tiny model) that a free loop ticks
# many times; at 48 tokens a call took ~0.1 s, which is too short to tell a free loop from a blocked one.
TICKED_ANSWER_TOKENS = 256


async def ticks_while(call) -> tuple[int, float]:
    """How often a 20 ms ticker ticked while ``call`` (a coroutine) ran, and how long it ran."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(TICK_S)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # the ticker starts first
    start = time.perf_counter()
    await call
    elapsed = time.perf_counter() - start
    task.cancel()
    return ticks, elapsed


def loop_ran_free(ticks: int, elapsed: float) -> bool:
    """Whether the ticker of :func:`ticks_while` kept ticking through a call that took ``elapsed`` s: a blocked
    loop ticks 0 times; a free one about elapsed / TICK_S, fewer on a busy machine (a 20 ms sleep can take 60)."""
    return elapsed > 5 * TICK_S and ticks >= max(3, elapsed / TICK_S / 8)


async def overlap(*calls) -> bool:
    """Whether coroutines gathered together ran at the same time: every one started before any ended."""
    spans: list[tuple[float, float]] = []

    async def timed(call) -> None:
        start = time.perf_counter()
        await call
        spans.append((start, time.perf_counter()))

    await asyncio.gather(*(timed(c) for c in calls))
    return max(s for s, _ in spans) < min(e for _, e in spans)


def write_corpus(tmp_path: Path) -> Path:
    """A source folder for ``infoflow-rag ingest``: one Markdown file of the PASSAGES, one a paragraph."""
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.md").write_text("\n\n".join(PASSAGES))
    return corpus


def without_attention_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine as where the compiled attention kernels did not build: every attention takes the torch paths."""
    from infoflow_rag.engine import attention

    monkeypatch.setattr(attention, "sparse_attention", lambda *args: None)
    monkeypatch.setattr(attention, "decode_attention", lambda *args: None)
    monkeypatch.setattr(attention, "few_row_attention", lambda *args: None)


def masked_sdpa_at(query, key, value, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Sorted queries at ``positions`` (Q,) over a cache in prompt order, as one SDPA call under the whole (Q, M) mask
    those positions imply: the reference for the sparse-query kernel and the torch path. -> (B, Q, heads, d)"""
    from infoflow_rag.engine.attention import masked_sdpa
    from infoflow_rag.engine.cache import position_mask

    mask = position_mask(positions, torch.arange(key.shape[2]), query.dtype)  # (1, 1, Q, M)
    return masked_sdpa(query, key, value, mask, scale)


def without_fast_linears(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every linear layer of an engine's model runs ``F.linear``: neither the few-row kernel nor oneDNN's packed
    product (torch's FLOP counter sees neither)."""
    from infoflow_rag.engine import few_rows, linears

    monkeypatch.setattr(few_rows, "few_row_linear", lambda *args: None)
    monkeypatch.setattr(linears.EngineLinear, "_packed_for", lambda self, x: None)


def compiled_calls_during(monkeypatch: pytest.MonkeyPatch, owner, name: str, run, describe):
    """``run()`` with the compiled kernel's wrapper ``owner.name`` spied on: its result and ``describe(*args)`` of
    every call the kernel is meant to take (``describe`` gives None for one it is not). Each such call must have run
    the kernel: where it did not build, a test that uses this fails instead of comparing the torch path with itself."""
    calls, kernel = [], getattr(owner, name)

    def spy(*args):
        out = kernel(*args)
        if (described := describe(*args)) is not None:
            assert out is not None, "the compiled kernel did not run: did it build? (see the RuntimeWarning)"
            calls.append(described)
        return out

    monkeypatch.setattr(owner, name, spy)
    try:
        return run(), calls
    finally:
        monkeypatch.undo()


def sparse_kernel_calls_during(monkeypatch: pytest.MonkeyPatch, run):
    """``run()`` with the sparse-query attention kernel (the recompute's and full prefill's) spied on: its result and
    the query positions of every call."""
    from infoflow_rag.engine import attention

    return compiled_calls_during(
        monkeypatch, attention, "sparse_attention", run, lambda query, key, value, positions, scale: positions.tolist()
    )


def pipelines_built_by_concurrent_first_calls(monkeypatch: pytest.MonkeyPatch, first_call) -> tuple[int, int]:
    """(pipelines built, distinct pipelines handed out) when 4 threads make an adapter's first call at once.
    ``Pipeline.from_model`` is a slow stub, so no model loads and the threads overlap."""
    from infoflow_rag.pipeline import Pipeline

    built: list[object] = []

    def slow_build(model: str, store: str = "memory") -> object:
        time.sleep(0.2)  # stands in for loading the model and its correctness check
        built.append(object())
        return built[-1]

    monkeypatch.setattr(Pipeline, "from_model", staticmethod(slow_build))
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(first_call())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(built), len({id(pipeline) for pipeline in got})
