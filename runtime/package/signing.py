"""Ed25519 keys and manifest signatures.

Keys are PEM files: private keys PKCS#8 (optionally encrypted with a passphrase),
public keys SubjectPublicKeyInfo. A key is named by its *key id*: the lowercase hex
SHA-256 of the raw 32-byte public key.

``manifest.sig`` is UTF-8 JSON::

    {"signatures": [{"keyid": "<64 hex>", "sig": "<base64 of the 64-byte ed25519 signature>"}]}

Each signature covers the exact bytes of ``manifest.json``. Verification (``verify_signature``)
is a pure function of those bytes and the trusted keys: it does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeship.errors import KeyFileError, SignatureError, UntrustedKeyError, UsageError

MAX_SIGNATURES = 16
_KEYID = re.compile(r"[0-9a-f]{64}")


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the key id: lowercase hex SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a reader trusts, by key id."""

    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def of(cls, keys: Iterable[Ed25519PublicKey]) -> TrustedKeys:
        return cls({key_id(k): k for k in keys})

    @classmethod
    def load(cls, paths: Iterable[str | os.PathLike[str]]) -> TrustedKeys:
        """Load public-key PEM files; raise ``KeyFileError`` naming a file that is not one."""
        return cls.of(load_public_key(p) for p in paths)

    def __bool__(self) -> bool:
        return bool(self.keys)


def generate_key() -> Ed25519PrivateKey:
    """Return a new random ed25519 private key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM of ``key``, encrypted with ``passphrase`` when one is given.

    The encryption is cryptography's PKCS#8 default (PBES2: PBKDF2-HMAC-SHA256 with 2048
    iterations, AES-256-CBC); cryptography offers no way to raise the iteration count for
    PKCS#8, so use a long passphrase (or keep release keys in an HSM).
    """
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of ``key``."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_keypair(out_dir: Path, name: str, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Generate a key pair and write ``<name>.key`` (mode 0600) and ``<name>.pub`` into ``out_dir``.

    Refuses to overwrite existing files (``UsageError``). Returns (private path, public path).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (priv_path, pub_path):
        if path.exists():
            raise UsageError(f"{path} already exists; choose another --name or directory (keys are never overwritten)")
    key = generate_key()
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key, passphrase))
    pub_path.write_bytes(public_key_pem(key.public_key()))
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an ed25519 PKCS#8 PEM private key; raise ``KeyFileError`` with the reason when it cannot."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        if passphrase is None:
            raise KeyFileError(f"private key {path} is encrypted; give its passphrase") from None
        raise KeyFileError(f"private key {path} is not encrypted; do not give a passphrase") from None
    except ValueError:
        if passphrase is not None:
            raise KeyFileError(f"cannot decrypt private key {path}: wrong passphrase or not a PEM key") from None
        raise KeyFileError(f"{path} is not a PEM private key") from None
    except Exception as exc:  # cryptography raises assorted types for unsupported encodings
        raise KeyFileError(f"{path} is not a usable PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"private key {path} is {type(key).__name__}, not ed25519; create one with 'edgeship keys generate'"
        )
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an ed25519 SubjectPublicKeyInfo PEM public key; raise ``KeyFileError`` when it cannot."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except Exception:  # ValueError or UnsupportedAlgorithm, depending on the bytes
        hint = " (that is a private key; pass the .pub file)" if b"PRIVATE KEY" in data else ""
        raise KeyFileError(f"{path} is not a PEM public key{hint}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"public key {path} is {type(key).__name__}, not ed25519")
    return key


def sign_manifest(manifest_bytes: bytes, keys: Iterable[Ed25519PrivateKey]) -> bytes:
    """Return the ``manifest.sig`` bytes: one signature of ``manifest_bytes`` per key."""
    signatures = [
        {"keyid": key_id(k.public_key()), "sig": base64.b64encode(k.sign(manifest_bytes)).decode("ascii")} for k in keys
    ]
    if not signatures:
        raise UsageError("a package needs at least one signing key")
    return json.dumps({"signatures": signatures}, sort_keys=True, separators=(",", ":")).encode("utf-8")


def verify_signature(manifest_bytes: bytes, signature_bytes: bytes, trusted: TrustedKeys) -> str:
    """Check ``manifest.sig`` against the manifest bytes and the trusted keys; return the key id that verified.

    Raises ``SignatureError`` when the signature file is malformed or a signature by a
    trusted key does not match, ``UntrustedKeyError`` when no signature is by a trusted key.
    """
    signatures = _parse_signatures(signature_bytes)
    if not trusted:
        raise UsageError("no trusted public keys given; pass the publisher's key (--key FILE.pub)")
    # Accept when any signature by a trusted key verifies, whatever the order: manifest.sig
    # is not itself signed, so a garbage entry added by anyone must not decide the outcome.
    failed = []
    for keyid, sig in signatures:
        key = trusted.keys.get(keyid)
        if key is None:
            continue
        try:
            key.verify(sig, manifest_bytes)
        except InvalidSignature:
            failed.append(keyid)
            continue
        return keyid
    if failed:
        raise SignatureError(
            f"the signature by key {failed[0][:16]} does not match manifest.json: the manifest was changed "
            "after signing or the package is corrupt; get the package again from its publisher"
        )
    signed_by = ", ".join(k[:16] for k, _ in signatures)
    trusted_ids = ", ".join(k[:16] for k in trusted.keys)
    raise UntrustedKeyError(
        f"the package is signed by key {signed_by}, which is not a trusted key ({trusted_ids}); "
        "pass the publisher's public key with --key if you trust it"
    )


def _parse_signatures(data: bytes) -> list[tuple[str, bytes]]:
    try:
        obj = json.loads(data.decode("utf-8"))
        entries = obj["signatures"]
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_SIGNATURES:
            raise ValueError("want 1 to 16 signatures")
        out = []
        for entry in entries:
            keyid, sig_b64 = entry["keyid"], entry["sig"]
            if not isinstance(keyid, str) or not _KEYID.fullmatch(keyid) or not isinstance(sig_b64, str):
                raise ValueError("a keyid is 64 lowercase hex digits and a sig is a base64 string")
            sig = base64.b64decode(sig_b64, validate=True)
            if len(sig) != 64:
                raise ValueError("an ed25519 signature is 64 bytes")
            out.append((keyid, sig))
        return out
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise SignatureError(
            f"manifest.sig is malformed ({exc}); the package is corrupt or was not signed by edgeship"
        ) from None
