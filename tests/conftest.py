import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

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


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family_engine(request) -> Engine:
    return Engine.load(tiny_model(request.param))


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine.load(tiny_model("llama"))


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
