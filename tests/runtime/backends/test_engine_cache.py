"""The TensorRT engine cache on disk: durable stores and pruning the engines of packages no longer installed."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from edgeship.runtime.backends.engine_cache import CacheState, EngineCache, EngineCacheKey

pytestmark = pytest.mark.py310


def key(package: str, gpu: str = "Orin") -> EngineCacheKey:
    return EngineCacheKey(gpu, "8.7", "10.3.0", package * 64, "s" * 64)


def test_store_writes_private_files_and_hits(tmp_path: Path):
    cache = EngineCache(tmp_path / "engines")
    cache.store(key("a"), b"plan")
    assert cache.lookup(key("a")).state is CacheState.HIT
    for path in (cache.engine_path(key("a")), cache.key_path(key("a"))):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in cache.directory.iterdir() if p.name.startswith(".")) == []


def test_prune_keeps_installed_packages_and_deletes_the_rest(tmp_path: Path):
    cache = EngineCache(tmp_path / "engines")
    kept = [key("a"), key("a", gpu="Thor"), key("b")]
    gone = [key("c"), key("d")]
    for k in kept + gone:
        cache.store(k, b"plan for " + k.package_sha256.encode())
    orphan_engine = cache.directory / ("e" * 64 + ".engine")  # its key write was interrupted
    orphan_engine.write_bytes(b"plan")
    orphan_key = cache.directory / ("f" * 64 + ".json")
    orphan_key.write_bytes(key("a").to_json())
    garbled = dataclasses.replace(key("a"), spec_sha256="t" * 64)
    cache.store(garbled, b"plan")
    cache.key_path(garbled).write_bytes(b"{not json")
    temporary = cache.directory / ".x.engine.1234.tmp"
    temporary.write_bytes(b"half a plan")
    unrelated = cache.directory / "README"
    unrelated.write_bytes(b"not ours")

    deleted = cache.prune({"a" * 64, "b" * 64})

    expected = {cache.engine_path(k) for k in gone} | {cache.key_path(k) for k in gone}
    expected |= {orphan_engine, orphan_key, cache.engine_path(garbled), cache.key_path(garbled), temporary}
    assert set(deleted) == expected and deleted == sorted(deleted)
    for k in kept:
        assert cache.lookup(k).state is CacheState.HIT
    for k in gone:
        assert cache.lookup(k).state is CacheState.MISS
    assert unrelated.exists()
    assert sorted(p.name for p in cache.directory.iterdir()) == sorted(
        [unrelated.name] + [p.name for k in kept for p in (cache.engine_path(k), cache.key_path(k))]
    )
    assert cache.prune({"a" * 64, "b" * 64}) == []


def test_prune_with_nothing_to_keep_empties_the_cache_and_a_missing_cache_is_empty(tmp_path: Path):
    cache = EngineCache(tmp_path / "engines")
    assert cache.prune(set()) == []
    cache.store(key("a"), b"plan")
    assert len(cache.prune(set())) == 2
    assert list(cache.directory.iterdir()) == []
