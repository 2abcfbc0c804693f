"""A passage index this process may not write (a read-only mount, a copy it does not own) serves search and reads,
writes nothing, and refuses adds and repairs by name."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny import BagOfWordsEmbedder

from infoflow_rag.index import PassageIndex, PassageRecords, ReadOnlyIndexError, VectorIndex

FACTS = [
    "The Rhine rises in the Swiss Alps and flows to the North Sea.",
    "Marie Curie won two Nobel prizes, in physics and in chemistry.",
    "The capital of Australia is Canberra, not Sydney.",
    "Basalt forms when lava cools quickly at the surface.",
]
CAP_DAC_OVERRIDE = 1  # root's right to write regardless of permission bits
CAP_DAC_READ_SEARCH = 2  # root's right to read regardless of them
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def _without_dac_override(*also: int) -> Iterator[None]:
    """This thread without CAP_DAC_OVERRIDE (and the capabilities ``also`` numbers) in its effective set (Linux
    capabilities are per thread), so root meets permission bits as any user does; restored afterwards."""
    if not sys.platform.startswith("linux"):
        pytest.skip("running as root, and dropping root's write override needs Linux capabilities")
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip(f"running as root, and capget failed: {os.strerror(ctypes.get_errno())}")
    saved = data[0].effective
    for capability in (CAP_DAC_OVERRIDE, *also):
        data[0].effective &= ~(1 << capability)
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip(f"running as root, and capset failed: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        data[0].effective = saved
        assert libc.capset(ctypes.byref(header), data) == 0


@contextlib.contextmanager
def denied(paths: list[Path], bits: int, *capabilities: int) -> Iterator[None]:
    """``paths`` without the permission ``bits``, as another user's files would be; as root, this thread also
    without CAP_DAC_OVERRIDE and ``capabilities``, which would override them."""
    modes = {path: path.stat().st_mode for path in paths}
    for path, mode in modes.items():
        path.chmod(mode & ~bits)
    try:
        with _without_dac_override(*capabilities) if os.geteuid() == 0 else contextlib.nullcontext():
            yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """``directory`` and the files in it without write permission, as a copy owned by another user would be."""
    with denied([directory, *directory.iterdir()], 0o222):
        with pytest.raises(PermissionError):  # the premise: this process really cannot write there
            (directory / "probe").touch()
        yield


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file()}


def test_read_only_index_serves_search_and_records_and_refuses_adds_by_name(tmp_path: Path) -> None:
    with PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        ids = index.add_passages(FACTS).ids
    before = snapshot(tmp_path)
    with unwritable(tmp_path):
        with PassageIndex.open(tmp_path, embedder=BagOfWordsEmbedder()) as index:
            assert index.search("capital of Australia", k=1)[0].text == FACTS[2]
            assert [r.text for r in index.get(ids[::-1])] == FACTS[::-1]
            assert [r.text for r in index] == FACTS and len(index) == 4
            with pytest.raises(ReadOnlyIndexError, match=f"{tmp_path} is read-only.*add them to a writable copy"):
                index.add_passages(["Owls hunt mostly at night."])
        with pytest.raises(ReadOnlyIndexError, match=f"{tmp_path} is read-only.*repair a writable copy"):
            PassageIndex.repair(tmp_path, embedder=BagOfWordsEmbedder())
    assert snapshot(tmp_path) == before  # no SQLite -wal or -shm, no schema, no vectors written


def test_read_only_index_leaves_passages_without_vectors_unwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        index.add_passages(FACTS[:2])
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # killed after the records' commit

            def killed(*args: object) -> None:
                raise KeyboardInterrupt

            m.setattr(VectorIndex, "save", killed)
            index.add_passages(FACTS[2:])
    before = snapshot(tmp_path)
    with unwritable(tmp_path), caplog.at_level(logging.WARNING, logger="infoflow_rag.index"):
        with PassageIndex.open(tmp_path, embedder=BagOfWordsEmbedder()) as index:
            assert index.search("Rhine North Sea", k=4)[0].text == FACTS[0]
            assert len(index.search("anything", k=4)) == 2
    assert "read-only: 2 passages without vectors" in caplog.text
    assert snapshot(tmp_path) == before


def test_read_only_records_see_a_writer_through_a_writable_path(tmp_path: Path) -> None:
    """The -shm of a live writer lets the reader keep SQLite's locks and read the WAL, so it sees each commit."""
    (tmp_path / "index").mkdir()
    path = tmp_path / "index" / "passages.sqlite"
    with PassageRecords(path) as writer:  # open: its -wal and -shm exist and hold its commits
        writer.add_many(["first"])
        with unwritable(tmp_path / "index"), PassageRecords(path, create=False, read_only=True) as reader:
            assert [r.text for r in reader] == ["first"]
            writer.add_many(["second"])  # through its open, writable files
            assert [r.text for r in reader] == ["first", "second"]


def test_read_only_index_with_wal_commits_but_no_shm_is_refused_by_name(tmp_path: Path) -> None:
    """Without a -shm it may create, SQLite could read only the main file: the WAL's commits would be missing."""
    (tmp_path / "copy").mkdir()
    with PassageIndex.create(tmp_path / "live", embedder=BagOfWordsEmbedder()) as index:
        index.add_passages(FACTS)  # committed to the WAL, folded into passages.sqlite when the index closes
        for name in ("index.json", "vectors.faiss", "passages.sqlite", "passages.sqlite-wal"):  # a copy without -shm
            shutil.copyfile(tmp_path / "live" / name, tmp_path / "copy" / name)
    with unwritable(tmp_path / "copy"), pytest.raises(ReadOnlyIndexError) as refused:
        PassageIndex.open(tmp_path / "copy", embedder=BagOfWordsEmbedder())
    assert str(refused.value).startswith(f"{tmp_path / 'copy'} is read-only")
    assert "passages.sqlite-wal holds commits" in str(refused.value) and "open it once with write access" in str(
        refused.value
    )


def test_read_only_records_of_index_format_1_have_no_identity(tmp_path: Path) -> None:
    """Format 1 had no meta table, and a read-only connection cannot add it: never stamped, so no identity."""
    path = tmp_path / "passages.sqlite"
    with PassageRecords(path) as records:
        records.add_many(["kept"])
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE meta")
    conn.close()
    with PassageRecords(path, create=False, read_only=True) as records:
        assert records.identity is None and [r.text for r in records] == ["kept"]


def test_records_this_process_may_not_read_are_named_not_called_lost(tmp_path: Path) -> None:
    """SQLite says only "unable to open database file", which read as a lost file: "delete the directory"."""
    with PassageIndex.create(tmp_path, embedder=BagOfWordsEmbedder()) as index:
        index.add_passages(FACTS)
    records = tmp_path / "passages.sqlite"
    with denied([records], 0o777, CAP_DAC_READ_SEARCH):
        with pytest.raises(PermissionError):  # the premise: this process really cannot read it
            records.read_bytes()
        with pytest.raises(PermissionError, match=f"{records} is not readable by this process") as refused:
            PassageIndex.open(tmp_path, embedder=BagOfWordsEmbedder())
    assert "delete" not in str(refused.value) and "ingest" not in str(refused.value)


def test_ingest_into_a_read_only_index_is_refused_before_any_work(tmp_path: Path, engine, capsys, monkeypatch) -> None:
    # It split every document and showed its progress bar before the first add was refused.
    from infoflow_rag import ingest as ingesting
    from infoflow_rag.pipeline import Pipeline
    from infoflow_rag.store import open_store

    with PassageIndex.create(tmp_path / "index", embedder=BagOfWordsEmbedder()) as index:
        index.add_passages(FACTS[:2])
    source = tmp_path / "docs"
    source.mkdir()
    (source / "owls.txt").write_text("Owls hunt mostly at night.")
    monkeypatch.setattr(ingesting, "split_documents", lambda *a: pytest.fail("split before the refusal"))
    with unwritable(tmp_path / "index"):
        pipeline = Pipeline(engine, open_store("memory"), PassageIndex.open(tmp_path / "index", BagOfWordsEmbedder()))
        with pytest.raises(ReadOnlyIndexError, match="is read-only.*add them to a writable copy"):
            ingesting.ingest(pipeline, source, progress=True)
        pipeline.index.close()
    assert "ingest" not in capsys.readouterr().err  # no progress bar
