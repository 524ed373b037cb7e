"""The package store: keyed files, written whole or not at all, keys that cannot escape the directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.errors import NotFoundError, UsageError
from edgeship.fleet.storage import LocalStorage


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def test_put_open_path_delete(store: LocalStorage, tmp_path: Path):
    source = tmp_path / "a.edgepkg"
    source.write_bytes(b"package bytes" * 1000)
    key = "digits/linux-x86_64/fp32/v3.edgepkg"
    assert store.put(key, source) == key
    assert store.exists(key)
    with store.open(key) as stream:
        assert stream.read() == source.read_bytes()
    path = store.path(key)
    assert path is not None and path.read_bytes() == source.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o644
    # Replacing keeps one file and no temporary leftovers.
    source.write_bytes(b"other")
    store.put(key, source)
    assert path.read_bytes() == b"other"
    assert sorted(p.name for p in path.parent.iterdir()) == ["v3.edgepkg"]
    store.delete(key)
    store.delete(key)  # a missing key is not an error
    assert not store.exists(key)
    with pytest.raises(NotFoundError, match="no package is stored under"):
        store.open(key)


@pytest.mark.parametrize("key", ["", "/abs/x", "../x", "a/../../x", "a/.hidden", "a//b", "a\\b"])
def test_keys_that_could_escape_or_hide_are_refused(store: LocalStorage, tmp_path: Path, key: str):
    source = tmp_path / "x"
    source.write_bytes(b"x")
    with pytest.raises(UsageError):
        store.put(key, source)


def test_an_unreadable_source_leaves_nothing(store: LocalStorage, tmp_path: Path):
    with pytest.raises(UsageError, match="cannot read"):
        store.put("a/v1.edgepkg", tmp_path / "missing")
    assert list((store.root / "a").iterdir()) == []
