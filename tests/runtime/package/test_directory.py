"""Verifying an unpacked package directory in place: fully, or cheaply when pinned by its manifest digest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeship.errors import IntegrityError, PackageFormatError, UnsafeMemberError, UsageError
from edgeship.runtime.package import unpack_package, verify_directory
from tests.package_fixtures import Publisher

pytestmark = pytest.mark.py310

ARTIFACT = "model/model.onnx"


@pytest.fixture
def slot(package: Path, publisher: Publisher, tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "slot"
    return path, unpack_package(package, path, trusted_keys=publisher.trusted).digest


def pinned(slot: tuple[Path, str], publisher: Publisher, **kwargs: object):
    path, digest = slot
    return verify_directory(path, trusted_keys=publisher.trusted, manifest_digest=digest, **kwargs)  # type: ignore[arg-type]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_intact_slot_passes_pinned_and_full(slot, publisher: Publisher):
    assert pinned(slot, publisher).digest == slot[1]
    assert pinned(slot, publisher, rehash=True).digest == slot[1]
    assert verify_directory(slot[0], trusted_keys=publisher.trusted).digest == slot[1]


def test_same_size_flip_passes_pinned_but_not_rehash_or_full(slot, publisher: Publisher):
    flip_a_byte(slot[0] / ARTIFACT)
    pinned(slot, publisher)  # sizes only: by design, contents were hashed at install
    with pytest.raises(IntegrityError, match=r"model/model.onnx in .* does not match its SHA-256"):
        pinned(slot, publisher, rehash=True)
    with pytest.raises(IntegrityError, match="SHA-256"):
        verify_directory(slot[0], trusted_keys=publisher.trusted)


def test_size_change_fails_the_pinned_open(slot, publisher: Publisher):
    with open(slot[0] / ARTIFACT, "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match=r"model/model.onnx is 3001 bytes on disk but 3000 in the manifest"):
        pinned(slot, publisher)


def test_extra_file_fails_the_pinned_open(slot, publisher: Publisher):
    (slot[0] / "model/evil.so").write_bytes(b"\x7fELF")
    with pytest.raises(IntegrityError, match=r"model/evil.so in .* is not listed in the manifest"):
        pinned(slot, publisher)


def test_manifest_edit_fails_the_pinned_open(slot, publisher: Publisher):
    manifest = slot[0] / "manifest.json"
    manifest.write_bytes(manifest.read_bytes() + b" ")
    with pytest.raises(IntegrityError, match=r"changed since the slot was installed.*reinstall"):
        pinned(slot, publisher)


def test_missing_file_fails_the_pinned_open(slot, publisher: Publisher):
    (slot[0] / "report/report.json").unlink()
    with pytest.raises(IntegrityError, match=r"report/report.json listed in the manifest is missing from"):
        pinned(slot, publisher)


def test_link_in_place_of_a_file_fails_the_pinned_open(slot, publisher: Publisher):
    target = slot[0] / ARTIFACT
    size = target.stat().st_size
    copy = slot[0].parent / "elsewhere.onnx"
    copy.write_bytes(b"\0" * size)
    target.unlink()
    os.symlink(copy, target)
    with pytest.raises(UnsafeMemberError, match=r"model/model.onnx in .* is not a regular file"):
        pinned(slot, publisher)


def test_directory_in_place_of_a_listed_file_is_not_a_regular_file(slot, publisher: Publisher):
    target = slot[0] / "report/report.json"
    target.unlink()
    target.mkdir()
    with pytest.raises(UnsafeMemberError, match=r"report/report.json in .* is not a regular file"):
        pinned(slot, publisher)


def test_pinned_open_still_checks_the_signature(slot, publisher: Publisher, stranger: Publisher):
    from edgeship.errors import UntrustedKeyError

    path, digest = slot
    with pytest.raises(UntrustedKeyError):
        verify_directory(path, trusted_keys=stranger.trusted, manifest_digest=digest)
    assert verify_directory(path, check_signature=False, manifest_digest=digest).signed_by is None


def test_missing_manifest_and_bad_digest_are_refused(slot, publisher: Publisher):
    with pytest.raises(UsageError, match="not a SHA-256"):
        verify_directory(slot[0], trusted_keys=publisher.trusted, manifest_digest="xyz")
    (slot[0] / "manifest.sig").unlink()
    with pytest.raises(PackageFormatError, match=r"manifest\.sig is missing"):
        pinned(slot, publisher)
