"""The fleet's TUF repository: files as ngclient fetches them, version bumps, refresh, key rotation, atomic writes."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from edgeship.device_agent.tuf_client import UpdateTrust
from edgeship.errors import KeyFileError, UsageError
from edgeship.fleet.static_server import StaticServer, serve_directory
from edgeship.fleet.tuf_repo import (
    Expiry,
    TufRepository,
    package_custom,
    target_path_for,
)
from edgeship.runtime.package import read_manifest
from tests.package_fixtures import Publisher

pytestmark = pytest.mark.py310

ROLES = ("root", "targets", "snapshot", "timestamp")


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "repo", tmp_path / "keys"


@pytest.fixture
def repo(paths: tuple[Path, Path]) -> TufRepository:
    directory, keys = paths
    return TufRepository.create(directory, keys_dir=keys)


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "payload.bin"
    path.write_bytes(b"model bytes " * 1000)
    return path


@pytest.fixture
def server(repo: TufRepository) -> Iterator[StaticServer]:
    with serve_directory(repo.directory) as running:
        yield running


def versions(repo: TufRepository) -> dict[str, int]:
    return {role: repo.version(role) for role in ROLES}


def client(server: StaticServer, cache: Path, root: bytes) -> UpdateTrust:
    return UpdateTrust(cache, server.url + "metadata/", server.url + "targets/", root)


def signed(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_bytes())["signed"]
    return data


# -- create / open --------------------------------------------------------------------------------


def test_create_writes_keys_and_metadata_where_ngclient_fetches_them(repo: TufRepository, paths: tuple[Path, Path]):
    directory, keys = paths
    names = sorted(p.name for p in (directory / "metadata").iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json"]
    assert (directory / "targets").is_dir()
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for role in ROLES:
        key_file = keys / f"{role}.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    root = signed(directory / "metadata" / "1.root.json")
    assert root["consistent_snapshot"] is True
    role_keys = {role: tuple(root["roles"][role]["keyids"]) for role in ROLES}  # type: ignore[index]
    assert len(set(role_keys.values())) == 4, "one distinct key per role"
    assert all(key["keytype"] == "ed25519" for key in root["keys"].values())  # type: ignore[attr-defined]
    assert versions(repo) == dict.fromkeys(ROLES, 1)
    assert repo.root_bytes() == (directory / "metadata" / "1.root.json").read_bytes()


def test_create_without_consistent_snapshot_uses_unversioned_names(tmp_path: Path, payload: Path):
    repo = TufRepository.create(tmp_path / "repo", keys_dir=tmp_path / "keys", consistent_snapshot=False)
    repo.add_target("models/a.edgepkg", payload)
    names = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert names == ["1.root.json", "snapshot.json", "targets.json", "timestamp.json"]
    assert (repo.targets_dir / "models" / "a.edgepkg").read_bytes() == payload.read_bytes()
    assert TufRepository.open(repo.directory, keys_dir=repo.keys_dir).version("targets") == 2


def test_create_refuses_an_existing_repository_and_existing_keys(repo: TufRepository, tmp_path: Path):
    with pytest.raises(UsageError, match="already holds a TUF repository"):
        TufRepository.create(repo.directory, keys_dir=tmp_path / "other-keys")
    with pytest.raises(UsageError, match="never overwritten"):
        TufRepository.create(tmp_path / "other-repo", keys_dir=repo.keys_dir)


def test_open_round_trip_reads_the_state_from_the_files(repo: TufRepository, payload: Path):
    repo.add_target("m/a.edgepkg", payload, {"edgeship": {"version": 1}})
    again = TufRepository.open(repo.directory, keys_dir=repo.keys_dir)
    assert versions(again) == versions(repo) == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    assert again.root_bytes() == repo.root_bytes()
    assert again.list_targets() == repo.list_targets()
    assert again.list_targets()["m/a.edgepkg"].custom == {"edgeship": {"version": 1}}
    # The second instance writes, the first sees it: no state is cached between calls.
    again.remove_target("m/a.edgepkg")
    assert repo.list_targets() == {}
    assert repo.version("targets") == 3


def test_open_refuses_a_directory_that_is_no_repository(tmp_path: Path):
    with pytest.raises(UsageError, match="not a TUF repository"):
        TufRepository.open(tmp_path, keys_dir=tmp_path / "keys")
    (tmp_path / "metadata").mkdir()
    with pytest.raises(UsageError, match="not a TUF repository"):
        TufRepository.open(tmp_path, keys_dir=tmp_path / "keys")


def test_expiry_periods_must_be_positive():
    assert Expiry().timestamp == timedelta(days=1) and Expiry().root == timedelta(days=365)
    with pytest.raises(UsageError, match="timestamp"):
        Expiry(timestamp=timedelta(0))
    with pytest.raises(UsageError, match="snapshot"):
        Expiry(snapshot=timedelta(seconds=-1))


def test_new_metadata_expires_after_the_configured_periods(tmp_path: Path):
    expiry = Expiry(
        root=timedelta(days=30), targets=timedelta(days=20), snapshot=timedelta(hours=5), timestamp=timedelta(minutes=7)
    )
    before = datetime.now(timezone.utc)
    repo = TufRepository.create(tmp_path / "repo", keys_dir=tmp_path / "keys", expiry=expiry)
    after = datetime.now(timezone.utc)
    for role in ROLES:
        # expiry is stored with one-second resolution (truncated)
        assert before + expiry.of(role) - timedelta(seconds=1) <= repo.expires(role) <= after + expiry.of(role)


# -- targets ----------------------------------------------------------------------------------------


def test_add_target_copies_the_file_under_its_hash_and_bumps_targets_snapshot_timestamp(
    repo: TufRepository, payload: Path
):
    info = repo.add_target("digits/linux/int8/v3.edgepkg", payload, {"edgeship": {"version": 3}})
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    assert (info.length, info.hashes) == (payload.stat().st_size, {"sha256": digest})
    stored = repo.targets_dir / "digits" / "linux" / "int8" / f"{digest}.v3.edgepkg"
    assert stored.read_bytes() == payload.read_bytes()
    assert versions(repo) == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    targets = signed(repo.metadata_dir / "2.targets.json")
    assert targets["targets"] == {
        "digits/linux/int8/v3.edgepkg": {
            "length": info.length,
            "hashes": {"sha256": digest},
            "custom": {"edgeship": {"version": 3}},
        }
    }
    assert signed(repo.metadata_dir / "2.snapshot.json")["meta"] == {"targets.json": {"version": 2}}
    assert signed(repo.metadata_dir / "timestamp.json")["meta"] == {"snapshot.json": {"version": 2}}


def test_set_custom_and_remove_target_bump_versions(repo: TufRepository, payload: Path):
    info = repo.add_target("m/a.edgepkg", payload)
    assert info.custom is None
    repo.set_custom("m/a.edgepkg", {"edgeship": {"downgrade_from": [4]}})
    assert versions(repo) == {"root": 1, "targets": 3, "snapshot": 3, "timestamp": 3}
    assert repo.list_targets()["m/a.edgepkg"].custom == {"edgeship": {"downgrade_from": [4]}}
    stored = repo.targets_dir / "m" / f"{info.hashes['sha256']}.a.edgepkg"
    assert stored.exists()
    repo.remove_target("m/a.edgepkg")
    assert versions(repo) == {"root": 1, "targets": 4, "snapshot": 4, "timestamp": 4}
    assert repo.list_targets() == {}
    assert not stored.exists()


def test_unlisted_targets_bad_paths_and_non_json_custom_are_refused(repo: TufRepository, payload: Path, tmp_path: Path):
    with pytest.raises(UsageError, match="not listed"):
        repo.set_custom("nope.edgepkg", {})
    with pytest.raises(UsageError, match="not listed"):
        repo.remove_target("nope.edgepkg")
    for bad in ("", "/abs.edgepkg", "a/../b.edgepkg", "a//b", ".hidden", "a/.tmp", "a\\b", "a\nb"):
        with pytest.raises(UsageError, match="target path"):
            repo.add_target(bad, payload)
    with pytest.raises(UsageError, match="JSON"):
        repo.add_target("a.edgepkg", payload, {"when": datetime.now()})
    with pytest.raises(UsageError, match="cannot read"):
        repo.add_target("a.edgepkg", tmp_path / "missing.bin")
    assert versions(repo) == dict.fromkeys(ROLES, 1), "nothing was published"


def test_replacing_a_target_keeps_the_old_file_for_downloads_in_flight(
    repo: TufRepository, payload: Path, tmp_path: Path
):
    first = repo.add_target("m/a.edgepkg", payload)
    other = tmp_path / "other.bin"
    other.write_bytes(b"new build")
    second = repo.add_target("m/a.edgepkg", other)
    assert first.hashes != second.hashes
    assert (repo.targets_dir / "m" / f"{first.hashes['sha256']}.a.edgepkg").exists()
    assert (repo.targets_dir / "m" / f"{second.hashes['sha256']}.a.edgepkg").read_bytes() == b"new build"
    assert repo.list_targets()["m/a.edgepkg"].length == len(b"new build")


def test_metadata_and_targets_are_written_atomically_and_leave_no_temporary_files(
    repo: TufRepository, payload: Path, tmp_path: Path
):
    repo.add_target("m/a.edgepkg", payload)
    repo.set_custom("m/a.edgepkg", {"x": 1})
    with pytest.raises(UsageError):
        repo.add_target("m/b.edgepkg", tmp_path / "missing.bin")
    repo.refresh_timestamp()
    repo.rotate_key("snapshot")
    repo.remove_target("m/a.edgepkg")
    hidden = [p for p in repo.directory.rglob(".*") if p.name != ".lock"]
    assert hidden == []
    assert sorted(p.name for p in repo.keys_dir.iterdir()) == sorted(f"{r}.pem" for r in ROLES)
    # every metadata file on disk is complete, parseable metadata
    for path in repo.metadata_dir.iterdir():
        Metadata.from_bytes(path.read_bytes())


def test_concurrent_processes_never_lose_a_target(repo: TufRepository, tmp_path: Path):
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from edgeship.fleet.tuf_repo import TufRepository
        repo = TufRepository.open(Path(sys.argv[1]), keys_dir=Path(sys.argv[2]))
        for i in range(12):
            payload = Path(sys.argv[3]) / f"{sys.argv[4]}-{i}.bin"
            payload.write_bytes(f"{sys.argv[4]} {i}".encode())
            repo.add_target(f"w/{sys.argv[4]}-{i}.edgepkg", payload)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(repo.directory), str(repo.keys_dir), str(tmp_path), name])
        for name in ("left", "right")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(repo.list_targets()) == 24
    assert versions(repo) == {"root": 1, "targets": 25, "snapshot": 25, "timestamp": 25}


# -- packages ---------------------------------------------------------------------------------------


def test_package_custom_and_path_come_from_the_verified_manifest(
    make_package: Callable[..., Path], publisher: Publisher, repo: TufRepository
):
    package = make_package(version=5)
    verified = read_manifest(package, trusted_keys=publisher.trusted)
    custom = package_custom(verified, downgrade_from=[9, 6, 6])
    assert custom == {
        "edgeship": {
            "name": "digits-cnn",
            "version": 5,
            "target": "linux-x86_64",
            "format": "onnx",
            "precision": "fp32",
            "manifest_sha256": hashlib.sha256(verified.raw).hexdigest(),
            "size": verified.manifest.total_size,
            "downgrade_from": [6, 9],
        }
    }
    assert target_path_for(verified.manifest) == "digits-cnn/linux-x86_64/fp32/v5.edgepkg"
    info = repo.add_package(package, trusted_keys=publisher.trusted, downgrade_from=[6])
    assert repo.list_targets() == {"digits-cnn/linux-x86_64/fp32/v5.edgepkg": info}
    assert info.custom["edgeship"]["downgrade_from"] == [6]
    assert info.length == package.stat().st_size


@pytest.mark.parametrize("bad", [5, 4, True, "7"])
def test_downgrade_from_lists_only_versions_above_the_package(
    make_package: Callable[..., Path], publisher: Publisher, bad: object
):
    verified = read_manifest(make_package(version=5), trusted_keys=publisher.trusted)
    with pytest.raises(UsageError, match="downgrade_from"):
        package_custom(verified, downgrade_from=[bad])  # type: ignore[list-item]


# -- freshness --------------------------------------------------------------------------------------


def test_refresh_timestamp_only_when_it_expires_within_the_margin(repo: TufRepository):
    before = versions(repo)
    assert repo.refresh_timestamp(within=timedelta(hours=1)) is False
    assert versions(repo) == before
    old_expiry = repo.expires("timestamp")
    assert repo.refresh_timestamp(within=timedelta(days=2)) is True
    assert versions(repo) == {**before, "timestamp": before["timestamp"] + 1}
    assert repo.expires("timestamp") >= old_expiry
    assert repo.refresh_timestamp() is True, "None: always"
    assert repo.version("timestamp") == before["timestamp"] + 2
    assert (repo.version("snapshot"), repo.version("targets")) == (1, 1)


def test_refresh_resigns_snapshot_and_targets_that_would_expire_before_the_new_timestamp(paths: tuple[Path, Path]):
    directory, keys = paths
    short = Expiry(targets=timedelta(hours=2), snapshot=timedelta(hours=1), timestamp=timedelta(hours=3))
    TufRepository.create(directory, keys_dir=keys, expiry=short)
    repo = TufRepository.open(directory, keys_dir=keys)  # default expiry from now on
    assert repo.refresh_timestamp(within=timedelta(hours=4)) is True
    assert versions(repo) == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    assert repo.expires("snapshot") > repo.expires("timestamp")
    assert repo.expires("targets") > repo.expires("snapshot")
    assert repo.refresh_timestamp(within=timedelta(hours=4)) is False


def test_refresh_needs_only_the_online_keys_and_names_a_missing_offline_one(paths: tuple[Path, Path], tmp_path: Path):
    directory, keys = paths
    TufRepository.create(directory, keys_dir=keys, expiry=Expiry(targets=timedelta(hours=1)))
    offline = tmp_path / "offline"
    offline.mkdir()
    for role in ("root", "targets"):
        shutil.move(keys / f"{role}.pem", offline / f"{role}.pem")
    repo = TufRepository.open(directory, keys_dir=keys, expiry=Expiry())
    with pytest.raises(KeyFileError, match="targets key"):
        repo.refresh_timestamp()  # targets expires within the day: it needs the offline key
    assert versions(repo) == dict.fromkeys(ROLES, 1), "nothing published without it"
    shutil.move(offline / "targets.pem", keys / "targets.pem")
    assert repo.refresh_timestamp() is True
    assert repo.refresh_timestamp(within=None) is True  # now only the online timestamp key signs
    with pytest.raises(KeyFileError, match="root key"):
        repo.rotate_key("timestamp")


def test_renew_root_publishes_the_next_root_version_that_clients_follow(
    repo: TufRepository, server: StaticServer, payload: Path, tmp_path: Path
):
    repo.add_target("m/a.edgepkg", payload)
    first_root = repo.root_bytes()
    repo.renew_root()
    assert repo.version("root") == 2
    assert (repo.metadata_dir / "2.root.json").read_bytes() == repo.root_bytes() != first_root
    client(server, tmp_path / "cache", first_root).lookup("m/a.edgepkg")
    assert signed(tmp_path / "cache" / "root.json")["version"] == 2


# -- key rotation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_rotated_key_is_followed_by_a_client_holding_the_old_root(
    role: str, repo: TufRepository, server: StaticServer, payload: Path, tmp_path: Path
):
    old_root = repo.root_bytes()
    repo.add_target("m/a.edgepkg", payload)
    device = client(server, tmp_path / "cache", old_root)
    device.lookup("m/a.edgepkg")
    old_key = (repo.keys_dir / f"{role}.pem").read_bytes()
    old_keyids = signed(repo.metadata_dir / "1.root.json")["roles"][role]["keyids"]  # type: ignore[index]

    new_keyid = repo.rotate_key(role)

    assert repo.version("root") == 2
    new_root = signed(repo.metadata_dir / "2.root.json")
    assert new_root["roles"][role]["keyids"] == [new_keyid]  # type: ignore[index]
    assert not set(old_keyids) & set(new_root["keys"])  # type: ignore[arg-type]
    assert (repo.keys_dir / f"{role}.pem").read_bytes() != old_key
    assert device.lookup("m/a.edgepkg").path == "m/a.edgepkg"
    assert signed(tmp_path / "cache" / "root.json")["version"] == 2
    # After the rotation, new versions are signed by the new key alone, and still verify.
    repo.add_target("m/b.edgepkg", payload)
    latest = json.loads((repo.metadata_dir / "timestamp.json").read_bytes())
    if role == "timestamp":
        assert [s["keyid"] for s in latest["signatures"]] == [new_keyid]
    assert device.lookup("m/b.edgepkg").length == payload.stat().st_size
    fresh = client(server, tmp_path / "fresh-cache", old_root)
    assert fresh.lookup("m/b.edgepkg").length == payload.stat().st_size


def test_rotating_the_root_key_is_refused(repo: TufRepository):
    with pytest.raises(UsageError, match="rotate_key"):
        repo.rotate_key("root")


def test_a_rotation_interrupted_before_the_key_moved_into_place_finishes_on_the_next_use(
    repo: TufRepository, server: StaticServer, payload: Path, tmp_path: Path
):
    old_root = repo.root_bytes()
    old_key = (repo.keys_dir / "timestamp.pem").read_bytes()
    repo.rotate_key("timestamp")
    new_key = (repo.keys_dir / "timestamp.pem").read_bytes()
    # The state a crash leaves after the new root was published but before the rename:
    # the new key under its temporary name, the old one under the real name.
    (repo.keys_dir / "timestamp.pem").rename(repo.keys_dir / "timestamp.pem.new")
    (repo.keys_dir / "timestamp.pem").write_bytes(old_key)
    repo.add_target("m/a.edgepkg", payload)
    assert (repo.keys_dir / "timestamp.pem").read_bytes() == new_key
    assert sorted(p.name for p in repo.keys_dir.iterdir()) == sorted(f"{r}.pem" for r in ROLES)
    assert client(server, tmp_path / "cache", old_root).lookup("m/a.edgepkg").path == "m/a.edgepkg"
