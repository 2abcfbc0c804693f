"""Building the compiled kernels (engine/kernels.py): once, where they can build; where they cannot, one warning and
the torch paths."""

import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import PASSAGES, QUESTION

from infoflow_rag.engine import kernels


def test_a_kernel_that_does_not_build_warns_once_and_the_engine_falls_back(engine, monkeypatch):
    from torch.utils import cpp_extension

    builds = []

    def no_compiler(*args, **kwargs):
        builds.append(kwargs["name"])
        raise RuntimeError("Error building extension: g++: not found")

    monkeypatch.setattr(kernels, "_loaded", [])
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="did not build .*g\\+\\+: not found.*Install g\\+\\+ and ninja"):
        assert kernels.load() is None
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert kernels.load() is None
    assert len(builds) == 1 and not again  # decided once: no second build, no second warning
    kvs = engine.prefill(PASSAGES)
    prep = engine.prepare(QUESTION, kvs, selector="infoflow", ratio=1.0)
    _, reference = engine.full_prefill_answer(QUESTION, PASSAGES, max_new_tokens=1)
    assert (prep.out.logits - reference).abs().max() <= 1e-4


def test_the_ninja_wheel_is_found_without_an_activated_venv(monkeypatch, tmp_path):
    import shutil

    import ninja

    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja here, as under `.venv/bin/python` from make or CI
    kernels._put_ninja_on_path()
    assert shutil.which("ninja") == str(Path(ninja.BIN_DIR) / "ninja")


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(monkeypatch, tmp_path):
    # torch's loader waits without end while a build's lock file exists; one left by a build killed long ago
    # must not hang every later process.
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    locks_seen = []

    def fake_build(*, name, build_directory, **kwargs):
        locks_seen.append((Path(build_directory) / "lock").exists())
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_build)
    name = f"infoflow_kernels_{kernels._cpu_tag()}"
    lock = kernels._build_directory(str(tmp_path), name) / "lock"
    lock.touch()
    old = time.time() - kernels.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    monkeypatch.setattr(kernels, "_loaded", [])
    with pytest.warns(RuntimeWarning, match="removed .*lock, left .* by a kernel build that did not finish"):
        assert kernels.load() == "module"
    lock.touch()  # a build in progress: left for torch to wait on
    monkeypatch.setattr(kernels, "_loaded", [])
    assert kernels.load() == "module"
    assert locks_seen == [False, True]
    assert lock.parent.parent.name.endswith(f"_torch{torch.__version__}")  # one build per torch version
