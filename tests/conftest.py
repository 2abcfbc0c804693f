import sys
from pathlib import Path

import pytest

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
    return Engine(tiny_model(request.param))


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine(tiny_model("llama"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """The tiny Llama saved as a Hugging Face directory, for commands that load a model by path."""
    path = tmp_path_factory.mktemp("model")
    loaded = tiny_model("llama")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return str(path)
