"""The ``edgeship`` command line, run as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeship import __version__

pytestmark = pytest.mark.py310


def edgeship(*args: str | os.PathLike[str], input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeship", *map(str, args)], capture_output=True, text=True, input=input, timeout=120
    )


def test_version():
    result = edgeship("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"edgeship {__version__}"


def test_help_lists_only_installed_groups():
    result = edgeship("--help")
    assert result.returncode == 0
    assert "keys" in result.stdout and "pkg" in result.stdout


def test_keys_generate_writes_a_private_key_only_its_owner_reads(tmp_path: Path):
    result = edgeship("keys", "generate", "--out", tmp_path / "keys", "--name", "release")
    assert result.returncode == 0, result.stderr
    private, public = tmp_path / "keys/release.key", tmp_path / "keys/release.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes() and b"BEGIN PUBLIC KEY" in public.read_bytes()
    again = edgeship("keys", "generate", "--out", tmp_path / "keys", "--name", "release")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_encrypted_key_needs_its_passphrase(tmp_path: Path):
    from edgeship.errors import KeyFileError
    from edgeship.runtime.package import load_private_key

    (tmp_path / "pass").write_text("correct horse\n")
    result = edgeship("keys", "generate", "--out", tmp_path, "--passphrase-file", tmp_path / "pass")
    assert result.returncode == 0, result.stderr
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "edgeship.key").read_bytes()
    load_private_key(tmp_path / "edgeship.key", b"correct horse")
    with pytest.raises(KeyFileError, match="encrypted; give its passphrase"):
        load_private_key(tmp_path / "edgeship.key")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_private_key(tmp_path / "edgeship.key", b"wrong")


def test_public_key_where_private_expected_and_vice_versa(tmp_path: Path):
    from edgeship.errors import KeyFileError
    from edgeship.runtime.package import load_private_key, load_public_key

    edgeship("keys", "generate", "--out", tmp_path)
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        load_private_key(tmp_path / "edgeship.pub")
    with pytest.raises(KeyFileError, match=r"pass the \.pub file"):
        load_public_key(tmp_path / "edgeship.key")


@pytest.fixture
def signed(tmp_path: Path, package: Path, publisher) -> tuple[Path, Path]:
    from edgeship.runtime.package.signing import public_key_pem

    pub = tmp_path / "publisher.pub"
    pub.write_bytes(public_key_pem(publisher.key.public_key()))
    return package, pub


def test_inspect_verify_unpack_a_good_package(signed: tuple[Path, Path], tmp_path: Path):
    pkg, pub = signed
    inspect = edgeship("pkg", "inspect", pkg, "--key", pub)
    assert inspect.returncode == 0, inspect.stderr
    assert "digits-cnn" in inspect.stdout and "valid" in inspect.stdout
    as_json = edgeship("pkg", "inspect", pkg, "--json")
    assert json.loads(as_json.stdout)["version"] == 3
    verify = edgeship("pkg", "verify", pkg, "-k", pub)
    assert verify.returncode == 0 and verify.stdout.startswith("OK digits-cnn v3")
    unpack = edgeship("pkg", "unpack", pkg, "-k", pub, "--out", tmp_path / "out")
    assert unpack.returncode == 0, unpack.stderr
    assert (tmp_path / "out/model/model.onnx").is_file()


def test_bad_package_gives_one_line_error_and_exit_3(signed: tuple[Path, Path], tmp_path: Path):
    pkg, pub = signed
    import tarfile

    with tarfile.open(pkg) as tar:
        offset = tar.getmember("model/model.onnx.data").offset_data
    data = bytearray(pkg.read_bytes())
    data[offset + 100] ^= 0x55
    pkg.write_bytes(bytes(data))
    result = edgeship("pkg", "unpack", pkg, "-k", pub, "--out", tmp_path / "out")
    assert result.returncode == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(signed: tuple[Path, Path], tmp_path: Path):
    _pkg, pub = signed
    result = edgeship("--debug", "pkg", "verify", pub, "-k", pub)
    assert result.returncode != 0 and "Traceback" in result.stderr and "PackageFormatError" in result.stderr


def test_verify_requires_a_key_and_says_so(signed: tuple[Path, Path]):
    pkg, _pub = signed
    result = edgeship("pkg", "verify", pkg)
    assert result.returncode == 2 and "--key" in result.stderr


def test_installed_version_refuses_rollback(signed: tuple[Path, Path]):
    pkg, pub = signed
    result = edgeship("pkg", "verify", pkg, "-k", pub, "--installed-version", "5")
    assert result.returncode == 3 and "not newer than the installed version 5" in result.stderr
