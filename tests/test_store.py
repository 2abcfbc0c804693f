"""KV store: keys, dtype round trips, LRU bound, disk/Redis verification, concurrency, factory."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from safetensors import safe_open

from infoflow_rag.files import atomic_write
from infoflow_rag.kv import PassageKV
from infoflow_rag.store import (
    CacheKey,
    DiskKVStore,
    KVStore,
    MemoryKVStore,
    RedisKVStore,
    open_store,
)

FINGERPRINT = "model-a|config-1234|float32|prefix:1,2,3"
BACKENDS = ["memory", "disk", pytest.param("redis", marks=pytest.mark.redis)]


def make_kv(seed: int = 0, n: int = 7, scale: float = 3.0) -> PassageKV:
    g = torch.Generator().manual_seed(seed)
    return PassageKV(
        token_ids=torch.randint(0, 50_000, (n,), generator=g),
        keys=torch.randn(3, 2, n, 8, generator=g) * scale,  # (layers, kv_heads, n, head_dim)
        values=torch.randn(3, 2, n, 8, generator=g) * scale,  # (layers, kv_heads, n, head_dim)
        offset=5,
        signals={"entropy": torch.rand(n, generator=g), "evolution": torch.rand(n, generator=g)},
    )


def key_for(kv: PassageKV, fingerprint: str = FINGERPRINT) -> CacheKey:
    return CacheKey.for_tokens(fingerprint, kv.token_ids)


def assert_exact_except_kv(got: PassageKV, want: PassageKV) -> None:
    assert torch.equal(got.token_ids, want.token_ids)
    assert got.offset == want.offset
    assert got.signals.keys() == want.signals.keys()
    for name, signal in want.signals.items():
        assert torch.equal(got.signals[name], signal)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., KVStore]]:
    """Builds stores of one backend; tests using it run once per backend."""
    backend = request.param
    opened: list[KVStore] = []

    def make(dtype: str = "float32") -> KVStore:
        if backend == "memory":
            store: KVStore = MemoryKVStore(dtype=dtype)
        elif backend == "disk":
            store = DiskKVStore(tmp_path / "kv", dtype=dtype)
        else:
            store = RedisKVStore(request.getfixturevalue("redis_url"), prefix=f"t{uuid.uuid4().hex}:", dtype=dtype)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


# ---------------------------------------------------------------- keys


def test_cache_key_hash_depends_on_tokens_only() -> None:
    as_list = CacheKey.for_tokens(FINGERPRINT, [1, 2, 3])
    assert as_list == CacheKey.for_tokens(FINGERPRINT, torch.tensor([1, 2, 3], dtype=torch.int32))
    assert as_list.token_hash != CacheKey.for_tokens(FINGERPRINT, [1, 2, 4]).token_hash
    assert as_list != CacheKey.for_tokens("model-b", [1, 2, 3])


# ---------------------------------------------------------------- every backend


def test_float32_round_trip_is_bit_exact(make_store: Callable[..., KVStore]) -> None:
    store, kv = make_store(), make_kv()
    store.put(key_for(kv), kv)
    got = store.get(key_for(kv))
    assert got is not None
    assert torch.equal(got.keys, kv.keys) and torch.equal(got.values, kv.values)
    assert_exact_except_kv(got, kv)
    assert (store.stats.hits, store.stats.misses) == (1, 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip_equals_the_cast(make_store: Callable[..., KVStore], dtype: str) -> None:
    store, kv = make_store(dtype), make_kv()
    store.put(key_for(kv), kv)
    got = store.get(key_for(kv))
    assert got is not None and got.keys.dtype == torch.float32
    torch_dtype = getattr(torch, dtype)
    assert torch.equal(got.keys, kv.keys.to(torch_dtype).float())
    assert torch.equal(got.values, kv.values.to(torch_dtype).float())
    assert_exact_except_kv(got, kv)


def test_int8_error_is_within_half_a_step_per_row(make_store: Callable[..., KVStore]) -> None:
    store, kv = make_store("int8"), make_kv()
    kv.keys[0, 0, 0] = 0.0  # an all-zero row must come back as zeros, not NaN
    store.put(key_for(kv), kv)
    got = store.get(key_for(kv))
    assert got is not None
    for original, restored in ((kv.keys, got.keys), (kv.values, got.values)):
        half_step = original.abs().amax(dim=-1, keepdim=True) / 254  # (layers, kv_heads, n, 1)
        assert torch.all((restored - original).abs() <= half_step * (1 + 1e-5) + 1e-7)
    assert torch.equal(got.keys[0, 0, 0], torch.zeros(8))
    assert_exact_except_kv(got, kv)


def test_empty_passage_round_trips(make_store: Callable[..., KVStore]) -> None:
    store, kv = make_store("int8"), make_kv(n=0)
    store.put(key_for(kv), kv)
    got = store.get(key_for(kv))
    assert got is not None and got.keys.shape == (3, 2, 0, 8)
    assert_exact_except_kv(got, kv)


def test_other_fingerprint_never_hits(make_store: Callable[..., KVStore]) -> None:
    store, kv = make_store(), make_kv()
    store.put(key_for(kv), kv)
    other = key_for(kv, "model-b|config-1234|float32|prefix:1,2,3")
    assert not store.contains(other)
    assert store.get(other) is None
    assert store.stats.misses == 1


def test_batched_ops_and_delete(make_store: Callable[..., KVStore]) -> None:
    store = make_store()
    kvs = [make_kv(seed) for seed in range(3)]
    keys = [key_for(kv) for kv in kvs]
    absent = key_for(make_kv(99))
    store.put_many(zip(keys, kvs, strict=True))
    assert [store.contains(k) for k in (keys[0], absent, keys[2])] == [True, False, True]
    got = store.get_many([keys[2], absent, keys[0]])
    assert got[1] is None
    assert torch.equal(got[0].keys, kvs[2].keys) and torch.equal(got[2].values, kvs[0].values)
    assert (store.stats.hits, store.stats.misses) == (2, 1)
    store.delete(keys[1])
    store.delete(absent)  # deleting a missing key is a no-op
    assert store.get(keys[1]) is None


def test_stored_entry_does_not_alias_caller_tensors(make_store: Callable[..., KVStore]) -> None:
    store, kv = make_store(), make_kv()
    original = kv.keys.clone()
    store.put(key_for(kv), kv)
    kv.keys.zero_()
    store.get(key_for(kv)).keys.zero_()
    assert torch.equal(store.get(key_for(kv)).keys, original)


def test_unknown_dtype_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="'float8'.*float32, float16, bfloat16, int8"):
        MemoryKVStore(dtype="float8")


# ---------------------------------------------------------------- memory LRU


def test_memory_lru_evicts_least_recently_used_within_byte_bound() -> None:
    kvs = [make_kv(seed) for seed in range(4)]
    entry_bytes = kvs[0].nbytes  # float32 storage: encoded size equals the PassageKV size
    store = MemoryKVStore(max_bytes=int(2.5 * entry_bytes))
    store.put(key_for(kvs[0]), kvs[0])
    store.put(key_for(kvs[1]), kvs[1])
    store.get(key_for(kvs[0]))  # 0 is now more recent than 1
    store.put(key_for(kvs[2]), kvs[2])
    assert [store.contains(key_for(kv)) for kv in kvs[:3]] == [True, False, True]
    assert store.nbytes == 2 * entry_bytes <= store.max_bytes
    assert store.stats.evictions == 1


def test_memory_skips_an_entry_larger_than_the_bound() -> None:
    kv = make_kv()
    store = MemoryKVStore(max_bytes=kv.nbytes - 1)
    store.put(key_for(kv), kv)
    assert len(store) == 0 and store.nbytes == 0


def test_memory_int8_counts_quantized_bytes() -> None:
    kv = make_kv()
    store = MemoryKVStore(dtype="int8")
    store.put(key_for(kv), kv)
    # int8 K/V plus one float32 scale per (layer, head, token) row of each
    kv_bytes = 2 * kv.keys.numel() + 2 * 4 * kv.keys[..., 0].numel()
    assert store.nbytes == kv_bytes + kv.token_ids.nbytes + sum(s.nbytes for s in kv.signals.values())


# ---------------------------------------------------------------- disk


def test_disk_layout_and_metadata(tmp_path: Path) -> None:
    kv = make_kv()
    store = DiskKVStore(tmp_path, dtype="float16")
    store.put(key_for(kv), kv)
    path = store.path_for(key_for(kv))
    assert path == tmp_path / key_for(kv).fingerprint_digest / f"{key_for(kv).token_hash}.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        assert f.get_tensor("keys").dtype == torch.float16
    assert metadata["offset"] == "5" and metadata["dtype"] == "float16"
    assert metadata["format_version"] == "1" and len(metadata["checksum"]) == 64
    assert metadata["key"] == key_for(kv).to_string()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the last bytes belong to the tensor data section
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _edit_offset_in_header(path: Path) -> None:
    data = path.read_bytes()
    assert b'"offset":"5"' in data
    path.write_bytes(data.replace(b'"offset":"5"', b'"offset":"6"'))


@pytest.mark.parametrize("damage", [_truncate, _flip_tensor_byte, _empty, _edit_offset_in_header])
def test_disk_damaged_file_is_dropped_not_served(
    tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    kv = make_kv()
    store = DiskKVStore(tmp_path)
    store.put(key_for(kv), kv)
    damage(store.path_for(key_for(kv)))
    with caplog.at_level(logging.WARNING, logger="infoflow_rag.store"):
        assert store.get(key_for(kv)) is None
    assert not store.path_for(key_for(kv)).exists()
    assert (store.stats.corrupt, store.stats.misses, store.stats.hits) == (1, 1, 0)
    assert "corrupt KV entry" in caplog.text


def test_disk_entry_under_wrong_key_is_dropped(tmp_path: Path) -> None:
    a, b = make_kv(0), make_kv(1)
    store = DiskKVStore(tmp_path)
    store.put(key_for(a), a)
    store.put(key_for(b), b)
    shutil.copyfile(store.path_for(key_for(a)), store.path_for(key_for(b)))
    assert store.get(key_for(b)) is None
    assert store.stats.corrupt == 1


def test_opening_a_disk_store_deletes_the_temp_files_of_writes_killed_midway(tmp_path: Path) -> None:
    # A SIGKILL during a put left its temp file (the entry's size) for good: nothing else deletes it.
    kv = make_kv()
    DiskKVStore(tmp_path).put(key_for(kv), kv)
    entry = DiskKVStore(tmp_path).path_for(key_for(kv))
    stale, fresh = entry.parent / f".{entry.name}.dead.tmp", entry.parent / f".{entry.name}.writing.tmp"
    for temp in (stale, fresh):
        temp.write_bytes(b"x" * 100)
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    store = DiskKVStore(tmp_path)
    assert not stale.exists() and fresh.exists()  # a write under way in another process is minutes old at most
    assert torch.equal(store.get(key_for(kv)).keys, kv.keys)


def _write_same_key(root: str, writer: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    kv = make_kv(scale=writer + 1)  # same tokens (same key) but a different payload per writer
    store = DiskKVStore(root)
    barrier.wait()
    for _ in range(25):
        store.put(key_for(kv), kv)


def test_disk_concurrent_writers_leave_one_valid_file(tmp_path: Path) -> None:
    # fork starts in milliseconds where spawn re-imports torch per child (~15 s here). It is safe
    # because the children only touch tiny tensors, so torch never enters an OpenMP parallel region.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    writers = [ctx.Process(target=_write_same_key, args=(str(tmp_path), i, barrier)) for i in range(4)]
    store = DiskKVStore(tmp_path)
    key = key_for(make_kv())
    payloads = [make_kv(scale=i + 1).keys for i in range(4)]
    for p in writers:
        p.start()
    deadline = time.monotonic() + 60
    while any(p.is_alive() for p in writers) and time.monotonic() < deadline:
        got = store.get(key)  # a reader racing the writers must only ever see whole files
        assert got is None or any(torch.equal(got.keys, keys) for keys in payloads)
    for p in writers:
        p.join(timeout=1)
    assert [p.exitcode for p in writers] == [0, 0, 0, 0]
    assert store.stats.corrupt == 0
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{key.token_hash}.safetensors"]
    got = store.get(key)
    assert got is not None and any(torch.equal(got.keys, keys) for keys in payloads)


# ---------------------------------------------------------------- redis


@pytest.mark.redis
@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b[:-3] + bytes([b[-3] ^ 0xFF]) + b[-2:]])
def test_redis_damaged_value_is_dropped_not_served(redis_url: str, damage: Callable[[bytes], bytes]) -> None:
    kv = make_kv()
    with RedisKVStore(redis_url) as store:
        store.put(key_for(kv), kv)
        raw = redis.Redis.from_url(redis_url)
        redis_key = store.redis_key(key_for(kv))
        raw.set(redis_key, damage(raw.get(redis_key)))
        assert store.get_many([key_for(kv)]) == [None]
        assert raw.exists(redis_key) == 0
        assert store.stats.corrupt == 1
        raw.close()


@pytest.mark.redis
def test_redis_prefixes_isolate_stores(redis_url: str) -> None:
    kv = make_kv()
    with RedisKVStore(redis_url, prefix="a:") as a, RedisKVStore(redis_url, prefix="b:") as b:
        a.put(key_for(kv), kv)
        assert a.contains(key_for(kv)) and not b.contains(key_for(kv))


def test_redis_repr_hides_password() -> None:
    store = RedisKVStore("redis://user:secret@127.0.0.1:1/0")  # connects lazily, so no server needed
    assert "secret" not in repr(store) and "127.0.0.1:1" in repr(store)


# ---------------------------------------------------------------- factory


def test_open_store_memory_specs() -> None:
    assert isinstance(open_store("memory"), MemoryKVStore)
    store = open_store("memory:512MB", dtype="int8")
    assert isinstance(store, MemoryKVStore) and store.max_bytes == 512 * 2**20 and store.dtype == "int8"


def test_open_store_disk_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_store(f"disk:{tmp_path / 'a'}").root == tmp_path / "a"
    assert open_store(str(tmp_path / "b")).root == tmp_path / "b"
    monkeypatch.chdir(tmp_path)
    assert open_store("./c").root == Path("c")
    (tmp_path / "existing").mkdir()
    assert isinstance(open_store("existing"), DiskKVStore)
    for empty in ("disk:", "disk: "):  # not the current directory
        with pytest.raises(ValueError, match=f"{empty!r} names no directory; write disk:DIR"):
            open_store(empty)


@pytest.mark.redis
def test_open_store_redis_spec(redis_url: str) -> None:
    kv = make_kv()
    with open_store(redis_url, prefix="spec:") as store:
        assert isinstance(store, RedisKVStore)
        store.put(key_for(kv), kv)
        assert store.get(key_for(kv)) is not None


@pytest.mark.parametrize("spec", ["nonsense", "memory:lots", "s3://bucket"])
def test_open_store_rejects_unknown_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="spec|size"):
        open_store(spec)


def test_replaced_files_get_the_permissions_a_plain_open_gives(tmp_path: Path) -> None:
    # mkstemp alone makes them owner-only: a store shared between users would miss every read
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write(tmp_path / "entry", b"kv")
    (tmp_path / "plain").write_bytes(b"kv")
    assert stat.S_IMODE((tmp_path / "entry").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "entry").stat().st_mode) == 0o666 & ~umask
