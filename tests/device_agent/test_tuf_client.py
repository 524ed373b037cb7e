"""The device's TUF client against a real repository on disk served by a real (fault-injecting) HTTP server."""

from __future__ import annotations

import hashlib
import json
import time
import tracemalloc
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile

from edgeship.device_agent.tuf_client import OfferedTarget, UpdateTrust, verify_file
from edgeship.errors import (
    DownloadError,
    MetadataExpiredError,
    MetadataRollbackError,
    TargetMismatchError,
    TargetNotListedError,
    UpdateError,
    UpdateTrustError,
)
from edgeship.fleet.tuf_repo import Expiry, TufRepository
from edgeship.runtime.package.signing import load_private_key
from tests.fleet.faulty_server import FaultyServer, serve_faulty

pytestmark = pytest.mark.py310

PACKAGE = "digits-cnn/linux-x86_64/int8/v3.edgepkg"
PAYLOAD = bytes(range(256)) * 300
CUSTOM = {"edgeship": {"name": "digits-cnn", "version": 3, "downgrade_from": [4]}}
SHORT = timedelta(seconds=4)


@dataclass
class Fleet:
    repo: TufRepository
    server: FaultyServer
    tmp: Path
    provisioned_root: bytes

    def device(self, cache: str = "cache") -> UpdateTrust:
        url = self.server.url
        return UpdateTrust(self.tmp / cache, url + "metadata/", url + "targets/", self.provisioned_root)

    def reopen(self, expiry: Expiry = Expiry()) -> TufRepository:
        self.repo = TufRepository.open(self.repo.directory, keys_dir=self.repo.keys_dir, expiry=expiry)
        return self.repo

    def publish(self, target_path: str, data: bytes) -> None:
        source = self.tmp / f"src-{hashlib.sha256(target_path.encode()).hexdigest()[:8]}"
        source.write_bytes(data)
        self.repo.add_target(target_path, source)

    def metadata(self, name: str) -> bytes:
        return (self.repo.metadata_dir / name).read_bytes()


def make_fleet(tmp_path: Path, *, consistent_snapshot: bool = True, expiry: Expiry = Expiry()) -> Fleet:
    repo = TufRepository.create(
        tmp_path / "repo", keys_dir=tmp_path / "keys", expiry=expiry, consistent_snapshot=consistent_snapshot
    )
    root = repo.root_bytes()
    source = tmp_path / "package.edgepkg"
    source.write_bytes(PAYLOAD)
    repo.add_target(PACKAGE, source, CUSTOM)
    return Fleet(repo, serve_faulty(repo.directory), tmp_path, root)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    made = make_fleet(tmp_path)
    with made.server:
        yield made


def wait_until_expired(repo: TufRepository, role: str) -> None:
    """Sleep until the role's current metadata is expired (no assertion on the time taken)."""
    expires = repo.expires(role)
    while datetime.now(timezone.utc) <= expires:
        time.sleep(0.05)


def download(offered: OfferedTarget, dest: Path) -> Path:
    with urllib.request.urlopen(offered.url, timeout=10) as response:
        dest.write_bytes(response.read())
    return dest


# -- listed / not listed --------------------------------------------------------------------------


@pytest.mark.parametrize("consistent", [True, False])
def test_listed_target_comes_with_its_signed_entry_and_a_url_that_serves_its_bytes(tmp_path: Path, consistent: bool):
    made = make_fleet(tmp_path, consistent_snapshot=consistent)
    with made.server:
        offered = made.device().lookup(PACKAGE)
        digest = hashlib.sha256(PAYLOAD).hexdigest()
        assert (offered.path, offered.length, offered.hashes) == (PACKAGE, len(PAYLOAD), {"sha256": digest})
        assert offered.custom == CUSTOM
        assert offered.edgeship == CUSTOM["edgeship"]
        served = f"digits-cnn/linux-x86_64/int8/{digest}.v3.edgepkg" if consistent else PACKAGE
        assert offered.url == made.server.url + "targets/" + served
        path = download(offered, tmp_path / "downloaded")
        assert path.read_bytes() == PAYLOAD
        verify_file(offered, path)
        UpdateTrust.verify_file(offered, path)


def test_the_url_is_the_one_ngclient_downloads_from(fleet: Fleet, tmp_path: Path):
    offered = fleet.device().lookup(PACKAGE)
    from tuf.ngclient import Updater

    updater = Updater(
        str(tmp_path / "ngclient"),
        fleet.server.url + "metadata/",
        str(tmp_path / "ngclient-targets"),
        fleet.server.url + "targets/",
        bootstrap=fleet.provisioned_root,
    )
    info = updater.get_targetinfo(PACKAGE)
    assert info is not None
    updater.download_target(info)
    assert fleet.server.requests[-1].path == "/" + offered.url.split("/", 3)[3]


def test_target_without_custom_data_has_empty_custom(fleet: Fleet):
    fleet.publish("plain/v1.edgepkg", b"plain")
    offered = fleet.device().lookup("plain/v1.edgepkg")
    assert (offered.custom, offered.edgeship) == ({}, {})


def test_unlisted_target_is_refused(fleet: Fleet):
    device = fleet.device()
    with pytest.raises(TargetNotListedError, match="not listed"):
        device.lookup("digits-cnn/linux-x86_64/int8/v4.edgepkg")
    fleet.repo.remove_target(PACKAGE)
    with pytest.raises(TargetNotListedError):
        device.lookup(PACKAGE)


# -- freshness: expiry, rollback, freeze ---------------------------------------------------------------


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_expired_metadata_is_refused(tmp_path: Path, role: str):
    made = make_fleet(tmp_path, expiry=Expiry(**{role: timedelta(seconds=1)}))
    with made.server:
        wait_until_expired(made.repo, role)
        with pytest.raises(MetadataExpiredError, match=f"{role}.*expired"):
            made.device().lookup(PACKAGE)


def test_replayed_older_timestamp_is_a_rollback(fleet: Fleet):
    device = fleet.device()
    device.lookup(PACKAGE)
    old_timestamp = fleet.metadata("timestamp.json")
    fleet.publish("other/v1.edgepkg", b"other")
    device.lookup("other/v1.edgepkg")  # the device now trusts the newer timestamp

    fleet.server.serve_stale("metadata/timestamp.json", old_timestamp)
    with pytest.raises(MetadataRollbackError, match="older than what this device already trusts"):
        device.lookup(PACKAGE)
    # A device that never saw the newer timestamp cannot tell: the replay is only detectable against trust.
    assert fleet.device("fresh-cache").lookup(PACKAGE).path == PACKAGE


def test_replayed_older_snapshot_is_a_rollback(fleet: Fleet):
    device = fleet.device()
    device.lookup(PACKAGE)  # trusts snapshot v2
    fleet.publish("other/v1.edgepkg", b"other")  # snapshot v3
    assert fleet.repo.version("snapshot") == 3
    fleet.server.serve_stale("metadata/3.snapshot.json", fleet.metadata("1.snapshot.json"))
    with pytest.raises(MetadataRollbackError):
        device.lookup("other/v1.edgepkg")


def test_frozen_timestamp_is_accepted_until_it_expires(tmp_path: Path):
    made = make_fleet(tmp_path)
    with made.server:
        repo = made.reopen(Expiry(timestamp=SHORT))
        repo.refresh_timestamp()
        device = made.device()
        device.lookup(PACKAGE)
        frozen = made.metadata("timestamp.json")
        made.publish("new/v1.edgepkg", b"new")
        made.server.serve_stale("metadata/timestamp.json", frozen)

        # A freeze cannot be told from "nothing new" while the timestamp is valid...
        assert device.lookup(PACKAGE).path == PACKAGE
        with pytest.raises(TargetNotListedError):
            device.lookup("new/v1.edgepkg")
        # ...but it ends when the frozen timestamp expires.
        wait_until_expired_timestamp(frozen)
        with pytest.raises(MetadataExpiredError, match="timestamp"):
            device.lookup(PACKAGE)


def wait_until_expired_timestamp(data: bytes) -> None:
    expires = datetime.strptime(json.loads(data)["signed"]["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc
    )
    while datetime.now(timezone.utc) <= expires:
        time.sleep(0.05)


def test_device_offline_past_expiry_recovers_by_itself_once_the_fleet_refreshes(tmp_path: Path):
    made = make_fleet(tmp_path)
    with made.server:
        repo = made.reopen(Expiry(timestamp=SHORT))
        repo.refresh_timestamp()
        device = made.device()
        assert device.lookup(PACKAGE).path == PACKAGE  # the device caches a timestamp that will expire

        wait_until_expired(repo, "timestamp")  # the device is "offline" while the fleet's timestamp expires
        with pytest.raises(MetadataExpiredError):
            device.lookup(PACKAGE)
        with pytest.raises(MetadataExpiredError):
            made.device().lookup(PACKAGE)  # a restarted agent, same cache: still expired remotely

        assert made.reopen(Expiry()).refresh_timestamp(within=timedelta(hours=1)) is True
        # The same cache directory, a new UpdateTrust (agent restart) and the old one: both recover.
        assert made.device().lookup(PACKAGE).path == PACKAGE
        assert device.lookup(PACKAGE).path == PACKAGE
        cached = json.loads((tmp_path / "cache" / "timestamp.json").read_bytes())["signed"]
        assert cached["version"] == made.repo.version("timestamp")


# -- signatures and transport ---------------------------------------------------------------------------


@pytest.mark.parametrize("signing_key", ["stranger", "snapshot-key"])
def test_targets_signed_by_a_wrong_key_are_refused(fleet: Fleet, signing_key: str):
    name = f"{fleet.repo.version('targets')}.targets.json"
    forged = Metadata.from_bytes(fleet.metadata(name))
    forged.signed.targets[PACKAGE] = TargetFile.from_data(PACKAGE, b"evil payload")
    if signing_key == "stranger":
        signer = CryptoSigner.generate_ed25519()
    else:
        signer = CryptoSigner(load_private_key(fleet.repo.keys_dir / "snapshot.pem"))
    forged.sign(signer)
    fleet.server.serve_stale(f"metadata/{name}", forged.to_bytes())
    with pytest.raises(UpdateTrustError, match="not signed by the keys this device trusts") as refused:
        fleet.device().lookup(PACKAGE)
    assert type(refused.value) is UpdateTrustError


def test_tampered_metadata_is_refused(fleet: Fleet):
    fleet.server.corrupt("metadata/timestamp.json", 40, times=None)
    with pytest.raises(UpdateTrustError) as refused:
        fleet.device().lookup(PACKAGE)
    assert type(refused.value) is UpdateTrustError


def test_network_and_http_failures_are_download_errors(fleet: Fleet, tmp_path: Path):
    device = fleet.device()
    fleet.server.cut_after("metadata/timestamp.json", 20)
    with pytest.raises(DownloadError, match="could not download update metadata"):
        device.lookup(PACKAGE)
    assert device.lookup(PACKAGE).path == PACKAGE, "the next lookup after a cut works"

    empty = tmp_path / "empty"
    empty.mkdir()
    with serve_faulty(empty) as nothing:
        lost = UpdateTrust(
            tmp_path / "cache2", nothing.url + "metadata/", nothing.url + "targets/", fleet.provisioned_root
        )
        with pytest.raises(DownloadError, match="404"):
            lost.lookup(PACKAGE)
    fleet.server.stop()
    with pytest.raises(DownloadError):
        device.lookup(PACKAGE)


def test_a_bad_provisioned_root_is_a_trust_error(fleet: Fleet, tmp_path: Path):
    url = fleet.server.url
    for root in (b"not json", fleet.metadata("timestamp.json")):
        with pytest.raises(UpdateTrustError, match="re-provision"):
            UpdateTrust(tmp_path / "cache", url + "metadata/", url + "targets/", root).lookup(PACKAGE)


def test_an_unwritable_cache_is_an_update_error(fleet: Fleet, tmp_path: Path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_bytes(b"")
    url = fleet.server.url
    with pytest.raises(UpdateError, match="metadata cache"):
        UpdateTrust(blocker / "cache", url + "metadata/", url + "targets/", fleet.provisioned_root).lookup(PACKAGE)


# -- verify_file -------------------------------------------------------------------------------------


def test_verify_file_refuses_corrupted_truncated_and_extended_files(fleet: Fleet, tmp_path: Path):
    offered = fleet.device().lookup(PACKAGE)
    good = download(offered, tmp_path / "good")
    verify_file(offered, good)

    corrupted = tmp_path / "corrupted"
    data = bytearray(PAYLOAD)
    data[len(data) // 2] ^= 0x01
    corrupted.write_bytes(bytes(data))
    with pytest.raises(TargetMismatchError, match="hash"):
        verify_file(offered, corrupted)

    truncated = tmp_path / "truncated"
    truncated.write_bytes(PAYLOAD[:-1])
    with pytest.raises(TargetMismatchError, match="length"):
        verify_file(offered, truncated)

    extended = tmp_path / "extended"
    extended.write_bytes(PAYLOAD + b"\0")
    with pytest.raises(TargetMismatchError, match="length"):
        verify_file(offered, extended)

    with pytest.raises(UpdateError, match="cannot read"):
        verify_file(offered, tmp_path / "missing")


def test_verify_file_catches_a_byte_flipped_in_transit(fleet: Fleet, tmp_path: Path):
    offered = fleet.device().lookup(PACKAGE)
    fleet.server.corrupt(".v3.edgepkg", 1234)
    with pytest.raises(TargetMismatchError, match="download the package again"):
        verify_file(offered, download(offered, tmp_path / "flipped"))
    verify_file(offered, download(offered, tmp_path / "again"))


def test_verify_file_streams_the_file(tmp_path: Path):
    size = 32 * 1024 * 1024
    big = tmp_path / "big.bin"
    with big.open("wb") as out:
        for _ in range(size // (1 << 20)):
            out.write(b"\xab" * (1 << 20))
    digest = hashlib.sha256()
    with big.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    offered = OfferedTarget("big.bin", size, {"sha256": digest.hexdigest()}, {}, "http://unused/")
    tracemalloc.start()
    try:
        verify_file(offered, big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"verify_file held {peak} bytes at once for a {size}-byte file"
