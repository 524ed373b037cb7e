"""The signed model package: round trip, and every kind of bad input refused cleanly."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeship.errors import (
    IntegrityError,
    ManifestError,
    PackageError,
    PackageFormatError,
    SignatureError,
    SizeLimitError,
    UnpackError,
    UnsafeMemberError,
    UntrustedKeyError,
    UsageError,
    VersionRollbackError,
)
from edgeship.runtime.package import (
    Limits,
    Manifest,
    read_manifest,
    unpack_package,
    verify_package,
    write_package,
)
from tests.package_fixtures import Publisher, draft_manifest, sample_contents
from tests.tarcraft import Member, manifest_bytes, manifest_for, write_tar

pytestmark = pytest.mark.py310

CONTENTS = {"model/model.onnx": b"\x08\x07model-bytes" * 10, "report/report.json": b"{}"}


def snapshot(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def assert_unpack_refused(
    pkg: Path, publisher: Publisher, error: type[PackageError], match: str, **kwargs: object
) -> PackageError:
    """Unpacking must raise ``error``, write nothing, and leave the parent directory as it was."""
    parent = pkg.parent / "unpack-here"
    parent.mkdir(exist_ok=True)
    before = snapshot(pkg.parent)
    with pytest.raises(error, match=match) as info:
        unpack_package(pkg, parent / "dest", trusted_keys=publisher.trusted, **kwargs)  # type: ignore[arg-type]
    assert snapshot(pkg.parent) == before, "a failed unpack left files behind"
    return info.value


# ---------------------------------------------------------------- round trip


def test_written_package_verifies_and_unpacks_byte_identical(package: Path, publisher: Publisher, tmp_path: Path):
    verified = verify_package(package, trusted_keys=publisher.trusted)
    assert verified.signed_by is not None
    dest = tmp_path / "out"
    unpack_package(package, dest, trusted_keys=publisher.trusted)
    for path, data in sample_contents().items():
        assert (dest / path).read_bytes() == data
    assert (dest / "manifest.json").read_bytes() == verified.raw
    assert Manifest.from_bytes((dest / "manifest.json").read_bytes()) == verified.manifest
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_package_starts_with_manifest_then_signature_and_is_pax(package: Path):
    with tarfile.open(package) as tar:
        names = tar.getnames()
        assert names[:2] == ["manifest.json", "manifest.sig"]
        assert all(m.isreg() for m in tar.getmembers())
    # POSIX ustar/pax headers ("ustar\0" + version "00"), not GNU's "ustar  \0" variant.
    assert package.read_bytes()[257:265] == b"ustar\x0000"
    assert sorted(names[2:]) == sorted(sample_contents())


def test_same_inputs_give_byte_identical_packages(tmp_path: Path, publisher: Publisher):
    a, b = tmp_path / "a.edgepkg", tmp_path / "b.edgepkg"
    for out in (a, b):
        write_package(out, draft_manifest(), sample_contents(), [publisher.key])
    assert a.read_bytes() == b.read_bytes()


def test_manifest_round_trips_through_json(package: Path, publisher: Publisher):
    m = read_manifest(package, trusted_keys=publisher.trusted).manifest
    assert Manifest.from_json(m.to_json()) == m
    assert m.golden is not None and m.golden.path == "golden/vectors.npz"
    assert {f.path for f in m.artifact_files()} == {"model/model.onnx"}


def test_directory_artifact_with_long_paths_round_trips(tmp_path: Path, publisher: Publisher):
    from edgeship.runtime.package import collect_directory

    src = tmp_path / "model.mlpackage"
    deep = src / "Data" / "com.apple.CoreML" / ("weights-" + "w" * 120)
    deep.mkdir(parents=True)
    (deep / "weight.bin").write_bytes(b"\x01" * 1000)
    (src / "Manifest.json").write_text("{}")
    contents = collect_directory(src, "model/model.mlpackage")
    out = tmp_path / "ml.edgepkg"
    write_package(
        out,
        draft_manifest(format="coreml", artifact_path="model/model.mlpackage", golden=None, report_path=None),
        contents,
        [publisher.key],
    )
    dest = tmp_path / "unpacked"
    unpack_package(out, dest, trusted_keys=publisher.trusted)
    assert (dest / "model/model.mlpackage/Manifest.json").read_text() == "{}"
    assert len(list((dest / "model/model.mlpackage").rglob("weight.bin"))) == 1


def test_writer_refuses_invalid_draft_and_leaves_nothing(tmp_path: Path, publisher: Publisher):
    out = tmp_path / "bad.edgepkg"
    with pytest.raises(ManifestError, match="artifact path"):
        write_package(out, draft_manifest(artifact_path="model/missing.tflite"), sample_contents(), [publisher.key])
    assert list(tmp_path.iterdir()) == []


def test_unpack_into_empty_existing_directory_works(package: Path, publisher: Publisher, tmp_path: Path):
    dest = tmp_path / "slot-b"
    dest.mkdir()
    unpack_package(package, dest, trusted_keys=publisher.trusted)
    assert (dest / "report/report.json").exists()


def test_unpack_refuses_non_empty_destination(package: Path, publisher: Publisher, tmp_path: Path):
    dest = tmp_path / "slot-b"
    dest.mkdir()
    (dest / "old-model.tflite").write_bytes(b"keep me")
    with pytest.raises(UnpackError, match="not empty"):
        unpack_package(package, dest, trusted_keys=publisher.trusted)
    assert [p.name for p in dest.iterdir()] == ["old-model.tflite"]


# ---------------------------------------------------------------- tampering and trust


def test_tampered_artifact_is_refused_by_hash(package: Path, publisher: Publisher):
    data = bytearray(package.read_bytes())
    with tarfile.open(package) as tar:
        offset = tar.getmember("model/model.onnx").offset_data
    data[offset + 10] ^= 0xFF
    package.write_bytes(bytes(data))
    assert_unpack_refused(package, publisher, IntegrityError, "model/model.onnx.*SHA-256")


def test_tampered_manifest_fails_the_signature(tmp_path: Path, publisher: Publisher):
    m = manifest_for(CONTENTS)
    original_sig = write_tar(tmp_path / "ok.edgepkg", m, [Member(p, d) for p, d in CONTENTS.items()], publisher.key)
    with tarfile.open(original_sig) as tar:
        sig = tar.extractfile("manifest.sig").read()  # type: ignore[union-attr]
    m["version"] = 99
    pkg = write_tar(
        tmp_path / "t.edgepkg", m, [Member(p, d) for p, d in CONTENTS.items()], publisher.key, signature=sig
    )
    err = assert_unpack_refused(pkg, publisher, SignatureError, "does not match manifest.json")
    assert not isinstance(err, UntrustedKeyError)


def test_package_signed_by_untrusted_key_is_refused(
    make_package: Callable[..., Path], publisher: Publisher, stranger: Publisher
):
    pkg = make_package(key=stranger.key)
    assert_unpack_refused(pkg, publisher, UntrustedKeyError, "not a trusted key")


def test_malformed_signature_file_is_refused(tmp_path: Path, publisher: Publisher):
    for sig in (b"", b"not json", b'{"signatures": []}', b'{"signatures": [{"keyid": "ab", "sig": "x"}]}'):
        pkg = write_tar(
            tmp_path / "s.edgepkg",
            manifest_for(CONTENTS),
            [Member(p, d) for p, d in CONTENTS.items()],
            publisher.key,
            signature=sig,
        )
        assert_unpack_refused(pkg, publisher, SignatureError, "manifest.sig is malformed")


def test_signature_check_needs_keys_unless_disabled_explicitly(package: Path):
    with pytest.raises(UsageError, match="no trusted public keys"):
        verify_package(package)
    assert verify_package(package, check_signature=False).signed_by is None


def test_older_or_same_version_is_refused(package: Path, publisher: Publisher):
    assert_unpack_refused(package, publisher, VersionRollbackError, "not newer", last_installed_version=3)
    assert_unpack_refused(package, publisher, VersionRollbackError, "not newer", last_installed_version=7)
    assert verify_package(package, trusted_keys=publisher.trusted, last_installed_version=2)


# ---------------------------------------------------------------- not a package at all


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 600, b"just some text\n" * 100, b"\0" * 10240],
    ids=["empty", "png", "text", "zeros"],
)
def test_file_that_is_not_an_archive_is_refused(tmp_path: Path, publisher: Publisher, payload: bytes):
    pkg = tmp_path / "x.edgepkg"
    pkg.write_bytes(payload)
    assert_unpack_refused(pkg, publisher, PackageFormatError, "not an edgeship package")


def test_compressed_package_is_refused(package: Path, publisher: Publisher, tmp_path: Path):
    import gzip

    gz = tmp_path / "x.edgepkg.gz"
    gz.write_bytes(gzip.compress(package.read_bytes()))
    assert_unpack_refused(gz, publisher, PackageFormatError, "not an uncompressed tar")


def test_plain_tar_without_manifest_first_is_refused(tmp_path: Path, publisher: Publisher):
    pkg = write_tar(tmp_path / "p.edgepkg", b"", [Member("model.onnx", b"x")], publisher.key, head=False)
    assert_unpack_refused(pkg, publisher, PackageFormatError, "expected manifest.json as member 1")


def test_missing_package_file_gives_clear_error(tmp_path: Path, publisher: Publisher):
    with pytest.raises(PackageError, match="does not exist"):
        verify_package(tmp_path / "nope.edgepkg", trusted_keys=publisher.trusted)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.8, 0.97])
def test_truncated_archive_is_refused(package: Path, publisher: Publisher, fraction: float):
    # Cut anywhere before the end of the last member's data (the zero blocks after it
    # carry no content: an archive cut inside them still holds every verified byte).
    with tarfile.open(package) as tar:
        last = tar.getmembers()[-1]
        content_end = last.offset_data + last.size
    package.write_bytes(package.read_bytes()[: int(content_end * fraction)])
    assert_unpack_refused(package, publisher, PackageError, "truncated|not an edgeship package")


def test_truncated_exactly_after_a_member_is_refused(package: Path, publisher: Publisher):
    with tarfile.open(package) as tar:
        member = tar.getmember("golden/vectors.npz")
        end = member.offset_data + ((member.size + 511) // 512) * 512
    package.write_bytes(package.read_bytes()[:end])
    assert_unpack_refused(package, publisher, IntegrityError, "missing; the package is truncated")


# ---------------------------------------------------------------- hostile members


@pytest.mark.parametrize("name", ["../evil.txt", "model/../../evil.txt", "/etc/evil.txt", "./model.onnx", "a//b"])
def test_member_with_escaping_path_is_refused(tmp_path: Path, publisher: Publisher, name: str):
    members = [Member(p, d) for p, d in CONTENTS.items()] + [Member(name, b"owned")]
    pkg = write_tar(tmp_path / "p.edgepkg", manifest_for(CONTENTS), members, publisher.key)
    assert_unpack_refused(pkg, publisher, UnsafeMemberError, "unsafe member name")
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize(
    ("kind", "linkname", "message"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "symbolic link"),
        (tarfile.LNKTYPE, "model/model.onnx", "hard link"),
        (tarfile.CHRTYPE, "", "device node"),
        (tarfile.BLKTYPE, "", "device node"),
        (tarfile.FIFOTYPE, "", "FIFO"),
        (tarfile.DIRTYPE, "", "directory entry"),
    ],
    ids=["symlink", "hardlink", "chardev", "blockdev", "fifo", "dir"],
)
def test_non_regular_member_is_refused(tmp_path: Path, publisher: Publisher, kind: bytes, linkname: str, message: str):
    members = [Member(p, d) for p, d in CONTENTS.items()] + [Member("model/extra", type=kind, linkname=linkname)]
    pkg = write_tar(tmp_path / "p.edgepkg", manifest_for(CONTENTS), members, publisher.key)
    assert_unpack_refused(pkg, publisher, UnsafeMemberError, message)


def test_symlink_listed_in_manifest_is_still_refused(tmp_path: Path, publisher: Publisher):
    contents = {"model/model.onnx": b""}
    members = [Member("model/model.onnx", type=tarfile.SYMTYPE, linkname="/etc/shadow")]
    pkg = write_tar(tmp_path / "p.edgepkg", manifest_for(contents), members, publisher.key)
    assert_unpack_refused(pkg, publisher, UnsafeMemberError, "symbolic link")


def test_member_not_listed_in_manifest_is_refused(tmp_path: Path, publisher: Publisher):
    members = [Member(p, d) for p, d in CONTENTS.items()] + [Member("model/backdoor.so", b"\x7fELF")]
    pkg = write_tar(tmp_path / "p.edgepkg", manifest_for(CONTENTS), members, publisher.key)
    assert_unpack_refused(pkg, publisher, IntegrityError, "backdoor.so.*not listed in the manifest")


def test_duplicate_member_is_refused(tmp_path: Path, publisher: Publisher):
    members = [Member(p, d) for p, d in CONTENTS.items()] + [Member("model/model.onnx", b"replacement")]
    pkg = write_tar(tmp_path / "p.edgepkg", manifest_for(CONTENTS), members, publisher.key)
    assert_unpack_refused(pkg, publisher, UnsafeMemberError, "appears twice")


def test_duplicate_of_manifest_later_in_archive_is_refused(tmp_path: Path, publisher: Publisher):
    members = [Member(p, d) for p, d in CONTENTS.items()] + [Member("manifest.json", b"{}")]
    pkg = write_tar(tmp_path / "p.edgepkg", manifest_for(CONTENTS), members, publisher.key)
    assert_unpack_refused(pkg, publisher, UnsafeMemberError, "reserved")


def test_member_size_differing_from_manifest_is_refused(tmp_path: Path, publisher: Publisher):
    m = manifest_for(CONTENTS)
    members = [Member("model/model.onnx", CONTENTS["model/model.onnx"] + b"extra"), Member("report/report.json", b"{}")]
    pkg = write_tar(tmp_path / "p.edgepkg", m, members, publisher.key)
    assert_unpack_refused(pkg, publisher, IntegrityError, "bytes in the archive but")


# ---------------------------------------------------------------- size caps


def test_member_over_the_size_cap_is_refused(package: Path, publisher: Publisher):
    assert_unpack_refused(
        package, publisher, SizeLimitError, "model.onnx.data.*per-member cap", limits=Limits(max_member_bytes=4000)
    )


def test_total_over_the_cap_is_refused(package: Path, publisher: Publisher):
    assert_unpack_refused(package, publisher, SizeLimitError, "expands to", limits=Limits(max_total_bytes=5000))


def test_too_many_members_is_refused(package: Path, publisher: Publisher):
    assert_unpack_refused(package, publisher, SizeLimitError, "lists 4 members", limits=Limits(max_members=3))


def test_archive_bomb_claiming_huge_members_is_refused_before_reading(tmp_path: Path, publisher: Publisher):
    # A signed manifest and a header that both claim 3 GiB and 600 members of 3 GiB: the
    # default caps refuse it from the manifest alone, without reading (or having) the data.
    huge = 3 << 30
    m = manifest_for({"model/model.onnx": b""})
    m["files"] = [{"path": "model/model.onnx", "size": huge, "sha256": "0" * 64}]
    pkg = write_tar(tmp_path / "bomb.edgepkg", m, [Member("model/model.onnx", b"", size=huge)], publisher.key)
    assert_unpack_refused(pkg, publisher, SizeLimitError, "over the per-member cap")
    m["files"] = [{"path": f"model/part{i:03d}", "size": 1 << 30, "sha256": "0" * 64} for i in range(600)]
    m["artifact"] = {"path": "model"}
    pkg = write_tar(tmp_path / "bomb2.edgepkg", m, [], publisher.key)
    assert_unpack_refused(pkg, publisher, SizeLimitError, "expands to 600.0 GiB")


def test_oversized_manifest_is_refused_before_it_is_read(package: Path, publisher: Publisher):
    assert_unpack_refused(
        package, publisher, SizeLimitError, "manifest.json is .* over", limits=Limits(max_manifest_bytes=100)
    )


def test_not_enough_free_space_is_refused_before_writing(tmp_path: Path, publisher: Publisher):
    # Statically sized: a real file system of 1 MiB (tmpfs) and a package of 2 MiB.
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=1m tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("needs root and mount to create a small file system")
    try:
        pkg = tmp_path / "big.edgepkg"
        write_package(
            pkg,
            draft_manifest(golden=None, report_path=None, artifact_path="model/model.onnx"),
            {"model/model.onnx": os.urandom(2 << 20)},
            [publisher.key],
        )
        with pytest.raises(UnpackError, match="not enough free space"):
            unpack_package(pkg, mnt / "dest", trusted_keys=publisher.trusted)
        assert list(mnt.iterdir()) == []
    finally:
        os.system(f"umount {mnt}")


def test_disk_full_during_unpack_removes_partial_files(tmp_path: Path, publisher: Publisher, monkeypatch):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=2m tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("needs root and mount to create a small file system")
    try:
        pkg = tmp_path / "big.edgepkg"
        write_package(
            pkg,
            draft_manifest(golden=None, report_path=None, artifact_path="model"),
            {"model/a.bin": os.urandom(700 << 10), "model/b.bin": os.urandom(700 << 10)},
            [publisher.key],
        )
        # The free-space pre-check passes only if it under-counts; make the disk fill up
        # by another writer between check and write: a filler file taking most of the space.
        import edgeship.runtime.package.reader as reader

        real_check = reader._check_free_space

        def check_then_fill(directory: Path, needed: int) -> None:
            real_check(directory, needed)
            (mnt / "other-writer").write_bytes(b"\0" * (1 << 20))

        monkeypatch.setattr(reader, "_check_free_space", check_then_fill)
        with pytest.raises(UnpackError, match="disk full"):
            unpack_package(pkg, mnt / "dest", trusted_keys=publisher.trusted)
        assert [p.name for p in mnt.iterdir()] == ["other-writer"]
    finally:
        os.system(f"umount {mnt}")


# ---------------------------------------------------------------- manifest schema


def _resign(tmp_path: Path, publisher: Publisher, manifest: dict | bytes) -> Path:
    return write_tar(tmp_path / "m.edgepkg", manifest, [Member(p, d) for p, d in CONTENTS.items()], publisher.key)


@pytest.mark.parametrize("field", ["name", "version", "target", "format", "files", "inputs", "provenance"])
def test_manifest_missing_a_required_field_is_refused(tmp_path: Path, publisher: Publisher, field: str):
    m = manifest_for(CONTENTS)
    del m[field]
    assert_unpack_refused(
        _resign(tmp_path, publisher, m), publisher, ManifestError, f"'{field}' is a required property"
    )


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("version", "3", "version"),
        ("version", 0, "version"),
        ("name", 42, "name"),
        ("format", "pdf", "format"),
        ("inputs", {"x": 1}, "inputs"),
        ("files", [{"path": "a", "size": -1, "sha256": "0" * 64}], "files/0/size"),
        ("files", [{"path": "a", "size": 1, "sha256": "XYZ"}], "files/0/sha256"),
    ],
)
def test_manifest_field_of_wrong_type_is_refused(
    tmp_path: Path, publisher: Publisher, field: str, value: object, where: str
):
    m = manifest_for(CONTENTS)
    m[field] = value
    assert_unpack_refused(_resign(tmp_path, publisher, m), publisher, ManifestError, f"at {where}")


def test_unknown_schema_version_is_refused_with_upgrade_hint(tmp_path: Path, publisher: Publisher):
    m = manifest_for(CONTENTS, schema_version=2)
    assert_unpack_refused(
        _resign(tmp_path, publisher, m), publisher, ManifestError, "schema_version 2 is not supported"
    )


@pytest.mark.parametrize("where", ["top", "artifact", "input", "file"])
def test_unknown_extra_field_is_refused(tmp_path: Path, publisher: Publisher, where: str):
    m = manifest_for(CONTENTS)
    target = {"top": m, "artifact": m["artifact"], "input": m["inputs"][0], "file": m["files"][0]}[where]
    target["backdoor"] = True
    assert_unpack_refused(_resign(tmp_path, publisher, m), publisher, ManifestError, "'backdoor' was unexpected")


def test_manifest_that_is_not_json_is_refused(tmp_path: Path, publisher: Publisher):
    assert_unpack_refused(
        _resign(tmp_path, publisher, b"\xff\xfe{not json"), publisher, ManifestError, "not valid UTF-8 JSON"
    )


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["model/A.bin", "model/a.bin"], "differ only in case"),
        (["model", "model/x"], "is a file but"),
        (["model/../x"], "'..' segment"),
        (["manifest.sig"], "reserved"),
    ],
)
def test_manifest_with_colliding_or_unsafe_paths_is_refused(
    tmp_path: Path, publisher: Publisher, paths: list[str], message: str
):
    contents = {p: b"data" for p in paths}
    m = manifest_for(contents)
    pkg = write_tar(tmp_path / "p.edgepkg", m, [], publisher.key)
    assert_unpack_refused(pkg, publisher, ManifestError, message)


def test_manifest_naming_an_unlisted_artifact_is_refused(tmp_path: Path, publisher: Publisher):
    m = manifest_for(CONTENTS, artifact={"path": "model/other.onnx"})
    assert_unpack_refused(_resign(tmp_path, publisher, m), publisher, ManifestError, "names no listed member")


def test_inspect_without_keys_reads_manifest_only(package: Path):
    verified = read_manifest(package, check_signature=False)
    assert verified.manifest.name == "digits-cnn"
    assert json.loads(manifest_bytes(verified.manifest.to_json()))["version"] == 3


def test_pax_header_long_name_member_is_checked_like_any_other(tmp_path: Path, publisher: Publisher):
    long_name = "model/" + "d" * 150 + "/w.bin"
    contents = {long_name: b"w" * 10, "model/model.onnx": b"m"}
    pkg = write_tar(
        tmp_path / "p.edgepkg",
        manifest_for(contents, artifact={"path": "model"}),
        [Member(p, d) for p, d in sorted(contents.items())],
        publisher.key,
    )
    dest = tmp_path / "d"
    unpack_package(pkg, dest, trusted_keys=publisher.trusted)
    assert (dest / long_name).read_bytes() == b"w" * 10
    with tarfile.open(fileobj=io.BytesIO(pkg.read_bytes())) as tar:
        assert long_name in tar.getnames()


# ---------------------------------------------------------------- review findings, each a regression test


def _sig_entries(publisher: Publisher, raw: bytes, *extra: tuple[str, bytes]) -> bytes:
    import base64

    from edgeship.runtime.package import key_id

    good = (key_id(publisher.key.public_key()), publisher.key.sign(raw))
    entries = [*extra, good] if extra else [good]
    return json.dumps({"signatures": [{"keyid": k, "sig": base64.b64encode(s).decode()} for k, s in entries]}).encode()


def test_garbage_signature_claiming_a_trusted_key_does_not_hide_a_good_one(tmp_path: Path, publisher: Publisher):
    from edgeship.runtime.package import key_id

    raw = manifest_bytes(manifest_for(CONTENTS))
    bogus = (key_id(publisher.key.public_key()), b"\0" * 64)
    for sig in (_sig_entries(publisher, raw, bogus), _sig_entries(publisher, raw)):
        pkg = write_tar(
            tmp_path / "s.edgepkg", raw, [Member(p, d) for p, d in CONTENTS.items()], publisher.key, signature=sig
        )
        assert verify_package(pkg, trusted_keys=publisher.trusted).signed_by == key_id(publisher.key.public_key())


def test_key_id_must_be_lowercase_hex(tmp_path: Path, publisher: Publisher):
    raw = manifest_bytes(manifest_for(CONTENTS))
    sig = _sig_entries(publisher, raw).replace(b'"keyid": "', b'"keyid": "Z', 1)
    sig = sig.replace(b'"keyid": "Z', b'"keyid": "Z')  # 65 chars now: not 64 lowercase hex
    pkg = write_tar(
        tmp_path / "s.edgepkg", raw, [Member(p, d) for p, d in CONTENTS.items()], publisher.key, signature=sig
    )
    assert_unpack_refused(pkg, publisher, SignatureError, "64 lowercase hex")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw.replace(b'"version":1', b'"version":1,"version":2'), "appears twice"),
        (lambda raw: raw.replace(b'"shape":[1,4]', b'"shape":[1,NaN]'), "not a JSON number"),
        (lambda raw: raw.replace(b'"name":"crafted"', b'"name":"crafted\\n"'), "control character"),
        (lambda raw: raw.replace(b'"schema_version":1', b'"schema_version":1.0'), "schema_version 1.0"),
        (lambda raw: raw.replace(b'"path":"report/report.json"', b'"path":"report/\\udc80.json"'), "lone surrogate"),
    ],
    ids=["duplicate-key", "nan", "trailing-newline", "float-schema-version", "lone-surrogate"],
)
def test_manifest_json_that_readers_could_disagree_on_is_refused(
    tmp_path: Path, publisher: Publisher, mutate, message: str
):
    raw = mutate(manifest_bytes(manifest_for(CONTENTS)))
    assert_unpack_refused(_resign(tmp_path, publisher, raw), publisher, ManifestError, message)


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"scale": [0.1, 0.2], "zero_point": [0], "axis": 1}, "2 scales but 1 zero points"),
        ({"scale": [0.1, 0.2], "zero_point": [0, 0], "axis": None}, "needs an axis"),
        ({"scale": [0.1, 0.2], "zero_point": [0, 0], "axis": 1}, "2 scales for axis 1 of size 4"),
        ({"scale": [0.1], "zero_point": [0], "axis": 5}, "outside the tensor's rank"),
    ],
)
def test_inconsistent_quantization_is_refused(tmp_path: Path, publisher: Publisher, quantization: dict, message: str):
    m = manifest_for(CONTENTS)
    m["inputs"][0]["quantization"] = quantization
    assert_unpack_refused(_resign(tmp_path, publisher, m), publisher, ManifestError, message)


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["MANIFEST.JSON"], "reserved"),
        (["manifest.json/x"], "reserved"),
        (["model/caf\u00e9.bin", "model/cafe\u0301.bin"], "collide"),
    ],
    ids=["reserved-upper", "reserved-as-dir", "nfc-nfd"],
)
def test_paths_that_collide_on_apple_file_systems_are_refused(tmp_path: Path, publisher: Publisher, paths, message):
    pkg = write_tar(tmp_path / "p.edgepkg", manifest_for({p: b"x" for p in paths}), [], publisher.key)
    assert_unpack_refused(pkg, publisher, ManifestError, message)


def test_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path, publisher: Publisher):
    raw = manifest_bytes(manifest_for(CONTENTS))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(raw)
        info.pax_headers = {"comment": "x" * (8 << 20)}
        tar.addfile(info, io.BytesIO(raw))
    pkg = tmp_path / "pax.edgepkg"
    pkg.write_bytes(buf.getvalue())
    assert_unpack_refused(pkg, publisher, PackageFormatError, "metadata, over the")


def test_unpacked_tree_and_written_package_are_readable_by_others(package: Path, publisher: Publisher, tmp_path: Path):
    assert package.stat().st_mode & 0o777 == 0o644
    dest = tmp_path / "slot"
    unpack_package(package, dest, trusted_keys=publisher.trusted)
    assert dest.stat().st_mode & 0o777 == 0o755
    assert (dest / "model").stat().st_mode & 0o777 == 0o755
    assert (dest / "model/model.onnx").stat().st_mode & 0o777 == 0o644


def test_staging_left_by_a_power_cut_is_removed_by_the_next_unpack(package: Path, publisher: Publisher, tmp_path: Path):
    stale = tmp_path / ".slot.partial-abc123"
    (stale / "model").mkdir(parents=True)
    (stale / "model/half-written.onnx").write_bytes(b"\0" * 10)
    unrelated = tmp_path / ".other.partial-xyz"
    unrelated.mkdir()
    unpack_package(package, tmp_path / "slot", trusted_keys=publisher.trusted)
    assert not stale.exists() and unrelated.exists()
