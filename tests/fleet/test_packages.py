"""Pushing packages: verified completely, stored, listed in TUF with their requirements, recorded; or refused
with one line and nothing left behind (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from edgeship.errors import IntegrityError, PackageError, UntrustedKeyError, UsageError, VersionRollbackError
from edgeship.fleet.models import Audit, Package
from edgeship.fleet.packages import allow_downgrade, find_package, list_packages, push_package
from tests.fleet.fleet_fixtures import FleetUnderTest
from tests.package_fixtures import Publisher, sample_contents

MakePackage = Callable[..., Path]


def nothing_left(fleet: FleetUnderTest, pushed: int = 0) -> None:
    """The refused push stored, listed and recorded nothing beyond ``pushed`` earlier packages."""
    ctx = fleet.ctx
    with ctx.db.session(readonly=True) as session:
        assert len(session.scalars(select(Package)).all()) == pushed
        assert len(session.scalars(select(Audit).where(Audit.action == "package.push")).all()) == pushed
    assert len(ctx.tuf.list_targets()) == pushed
    stored = [p for p in ctx.settings.packages_dir.rglob("*") if p.is_file()]
    assert len(stored) == pushed


def test_push_stores_lists_and_records(any_fleet: FleetUnderTest, make_package: MakePackage):
    ctx = any_fleet.ctx
    path = make_package(version=3)
    row = push_package(ctx, path, "token:root")
    assert (row.name, row.version, row.target, row.format, row.precision) == (
        "digits-cnn",
        3,
        "linux-x86_64",
        "onnx",
        "fp32",
    )
    assert row.target_path == "digits-cnn/linux-x86_64/fp32/v3.edgepkg"
    assert row.size == path.stat().st_size
    stored = ctx.storage.path(row.storage_key)
    assert stored is not None and stored.read_bytes() == path.read_bytes()
    listed = ctx.tuf.list_targets()[row.target_path]
    assert listed.hashes["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    meta = listed.custom["edgeship"]
    assert meta["name"] == "digits-cnn" and meta["version"] == 3 and meta["manifest_sha256"] == row.manifest_sha256
    assert meta["requirements"] == {
        "target": "linux-x86_64",
        "format": "onnx",
        "runtime": {"name": "onnxruntime", "version": "1.31"},
        "min_memory_mib": meta["requirements"]["min_memory_mib"],
    }
    assert meta["requirements"]["min_memory_mib"] >= 64
    assert row.requirements == meta["requirements"]
    with ctx.db.session(readonly=True) as session:
        entry = session.scalars(select(Audit).where(Audit.action == "package.push")).one()
    assert entry.actor == "token:root" and entry.subject == f"package:{row.id}"
    assert entry.details["signed_by"] is not None


def test_the_models_memory_need_goes_into_the_requirements(fleet: FleetUnderTest, make_package: MakePackage):
    path = make_package(target="jetson-orin-nano", format="tensorrt-onnx", precision="fp16")
    row = push_package(fleet.ctx, path, "t")
    assert row.requirements["target"] == "jetson-orin-nano" and row.requirements["format"] == "tensorrt-onnx"
    assert row.requirements["runtime"] == {"name": "tensorrt", "version": "10.3"}
    # A few kB of model: the runtime's share dominates; never the device's whole memory (4096 MiB here).
    assert 64 < row.requirements["min_memory_mib"] < 100


def test_bad_signature_is_refused_with_one_line(
    any_fleet: FleetUnderTest, make_package: MakePackage, stranger: Publisher
):
    path = make_package(key=stranger.key)
    with pytest.raises(UntrustedKeyError) as info:
        push_package(any_fleet.ctx, path, "t")
    assert str(info.value).startswith(f"{path.name}: ") and "\n" not in str(info.value)
    nothing_left(any_fleet)


def test_unknown_target_is_refused_suggesting_the_nearest(any_fleet: FleetUnderTest, make_package: MakePackage):
    path = make_package(target="linux-x86-64")
    with pytest.raises(PackageError, match=r"unknown target 'linux-x86-64'; did you mean linux-x86_64") as info:
        push_package(any_fleet.ctx, path, "t")
    assert "\n" not in str(info.value)
    nothing_left(any_fleet)


def test_version_not_above_the_current_one_is_refused_naming_it(any_fleet: FleetUnderTest, make_package: MakePackage):
    push_package(any_fleet.ctx, make_package(version=5), "t")
    for version in (5, 4):
        with pytest.raises(VersionRollbackError, match=r"v\d for linux-x86_64/fp32 is not above the current version 5"):
            push_package(any_fleet.ctx, make_package(version=version), "t")
    nothing_left(any_fleet, pushed=1)
    # Another precision or target is another line of versions.
    push_package(any_fleet.ctx, make_package(version=1, precision="int8-dynamic"), "t")
    push_package(any_fleet.ctx, make_package(version=6), "t")
    rows, total = list_packages(any_fleet.ctx, name="digits-cnn")
    assert total == 3 and [r.version for r in rows] == [6, 1, 5]


def test_format_or_precision_the_target_does_not_run_is_refused(fleet: FleetUnderTest, make_package: MakePackage):
    with pytest.raises(PackageError, match="is onnx, but target android-arm64 runs tflite"):
        push_package(fleet.ctx, make_package(target="android-arm64"), "t")
    with pytest.raises(PackageError, match="precision int8-qdq is not one target linux-arm64 runs"):
        push_package(fleet.ctx, make_package(target="linux-arm64", format="tflite", precision="int8-qdq"), "t")
    nothing_left(fleet)


def test_a_tampered_member_is_refused(fleet: FleetUnderTest, make_package: MakePackage):
    path = make_package()
    data = bytearray(path.read_bytes())
    model = sample_contents()["model/model.onnx"]
    offset = bytes(data).find(model[:64])
    assert offset > 0
    data[offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="SHA-256"):
        push_package(fleet.ctx, path, "t")
    nothing_left(fleet)


def test_not_a_package(fleet: FleetUnderTest, tmp_path: Path):
    junk = tmp_path / "junk.edgepkg"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(PackageError, match=r"^junk\.edgepkg: "):
        push_package(fleet.ctx, junk, "t")
    nothing_left(fleet)


def test_a_failed_tuf_listing_leaves_nothing(fleet: FleetUnderTest, make_package: MakePackage):
    # The targets key offline: the push cannot be listed, so it is not stored or recorded either.
    key = fleet.ctx.settings.tuf_keys_dir / "targets.pem"
    key.rename(key.with_suffix(".offline"))
    from edgeship.errors import KeyFileError

    with pytest.raises(KeyFileError, match="the targets key"):
        push_package(fleet.ctx, make_package(), "t")
    nothing_left(fleet)


def test_find_package_and_allow_downgrade(any_fleet: FleetUnderTest, make_package: MakePackage):
    ctx = any_fleet.ctx
    v3 = push_package(ctx, make_package(version=3), "t")
    push_package(ctx, make_package(version=3, precision="int8-dynamic"), "t")
    with ctx.db.session(readonly=True) as session:
        assert find_package(session, "digits-cnn", 3, "linux-x86_64", "fp32").id == v3.id
        with pytest.raises(UsageError, match="several precisions"):
            find_package(session, "digits-cnn", 3, "linux-x86_64")
        from edgeship.errors import NotFoundError

        with pytest.raises(NotFoundError, match="pushed for linux-x86_64: v3/fp32, v3/int8-dynamic"):
            find_package(session, "digits-cnn", 9, "linux-x86_64")
    assert allow_downgrade(ctx, v3, [4, 5]) == [4, 5]
    meta = ctx.tuf.list_targets()[v3.target_path].custom["edgeship"]
    assert meta["downgrade_from"] == [4, 5] and meta["requirements"]["target"] == "linux-x86_64"
    with pytest.raises(UsageError, match="takes versions above 3"):
        allow_downgrade(ctx, v3, [3])


def test_concurrent_pushes_of_one_version_record_exactly_one(any_fleet: FleetUnderTest, make_package: MakePackage):
    from concurrent.futures import ThreadPoolExecutor

    builds = []
    for i in range(4):
        contents = sample_contents()
        contents["report/report.json"] = f'{{"build": {i}}}'.encode()
        builds.append(make_package(version=7, contents=contents))

    def push(path: Path) -> str:
        try:
            return push_package(any_fleet.ctx, path, "t").manifest_sha256
        except VersionRollbackError:
            return "refused"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(push, builds))
    winners = [o for o in outcomes if o != "refused"]
    assert len(winners) == 1
    nothing_left(any_fleet, pushed=1)
    listed = any_fleet.ctx.tuf.list_targets()["digits-cnn/linux-x86_64/fp32/v7.edgepkg"]
    assert listed.custom["edgeship"]["manifest_sha256"] == winners[0]
