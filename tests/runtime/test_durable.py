"""Durable writes: atomic replacement, directory fsync, and tree removal that a crash cannot leave half-done."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgeship.runtime import durable

pytestmark = pytest.mark.py310


def test_write_atomic_replaces_contents_with_the_given_mode(tmp_path: Path):
    target = tmp_path / "journal.json"
    durable.write_atomic(target, b"one")
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    durable.write_atomic(target, b"two", mode=0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"], "a temporary file was left behind"


def test_failed_write_atomic_keeps_the_old_target_and_leaves_no_temporary_file(tmp_path: Path):
    target = tmp_path / "state"
    target.mkdir()  # a rename of a file over a directory fails
    (target / "inside").write_bytes(b"old")
    with pytest.raises(OSError):
        durable.write_atomic(target, b"new")
    assert (target / "inside").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_write_atomic_into_a_missing_directory_raises(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        durable.write_atomic(tmp_path / "missing" / "f", b"x")


def test_fsync_helpers_accept_paths_and_descriptors(tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    durable.fsync_file(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        durable.fsync_file(fd)
    finally:
        os.close(fd)
    durable.fsync_dir(tmp_path)
    with pytest.raises(OSError):
        durable.fsync_dir(tmp_path / "missing")


def _tree(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model/m.onnx").write_bytes(b"m" * 100)
    (root / "manifest.json").write_bytes(b"{}")
    return root


def test_remove_tree_removes_everything_and_is_idempotent(tmp_path: Path):
    slot = _tree(tmp_path / "slot-a")
    durable.remove_tree(slot)
    assert list(tmp_path.iterdir()) == []
    durable.remove_tree(slot)  # already gone: fine


def test_remove_tree_finishes_what_an_interrupted_removal_left(tmp_path: Path):
    # A crash after the rename, during the deletion: the half-deleted tree is only under the hidden name.
    leftover = _tree(tmp_path / ".slot-a.removing-0badc0de")
    (leftover / "model/m.onnx").unlink()
    other = _tree(tmp_path / "slot-b")
    durable.remove_tree(tmp_path / "slot-a")  # slot-a itself is already gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot-b"]
    assert (other / "model/m.onnx").exists()


def test_remove_tree_removes_a_link_without_following_it(tmp_path: Path):
    kept = _tree(tmp_path / "kept")
    link = tmp_path / "current"
    link.symlink_to(kept)
    durable.remove_tree(link)
    assert not link.exists() and not link.is_symlink()
    assert (kept / "model/m.onnx").read_bytes() == b"m" * 100


def test_remove_tree_never_leaves_a_partial_tree_under_the_original_name(tmp_path: Path, monkeypatch):
    slot = _tree(tmp_path / "slot-a")

    def power_cut(path: object, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("power cut in the middle of the deletion")

    monkeypatch.setattr(durable.shutil, "rmtree", power_cut)
    with pytest.raises(KeyboardInterrupt):
        durable.remove_tree(slot)
    assert not slot.exists(), "the original name must be gone before anything is deleted"
    monkeypatch.undo()
    durable.remove_tree(slot)
    assert list(tmp_path.iterdir()) == []
