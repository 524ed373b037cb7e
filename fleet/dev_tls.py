"""A development PKI: a CA, a server certificate and client certificates, written as PEM files.

For tests, demos and a first local setup of the broker (``edgeship.fleet.broker``) and other
TLS endpoints: keys are ECDSA P-256, private keys are written 0600, certificates carry the
extensions strict verifiers check (basic constraints, key usage, extended key usage, subject and
authority key identifiers, subject alternative names). Production uses the operator's own CA
and issuance process; nothing here rotates, revokes or protects the CA key beyond file modes.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeship.device_agent import topics
from edgeship.errors import ConfigError


@dataclass(frozen=True)
class ClientCert:
    """A client certificate and its private key (PEM files) for mutual TLS."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsFiles:
    """Where a development CA, the server certificate and client certificates live (PEM, keys 0600)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def client(self, name: str) -> ClientCert:
        """Paths of the client certificate for account ``name`` (they exist once issued)."""
        return ClientCert(self.directory / "clients" / f"{name}.crt", self.directory / "clients" / f"{name}.key")


_DEV_CERT_DAYS = 825  # what browsers/OpenSSL tooling accept as the longest leaf lifetime


def create_dev_tls(
    directory: Path,
    *,
    hosts: Iterable[str] = ("127.0.0.1", "localhost"),
    clients: Iterable[str] = (),
    ca_name: str = "edgeship development CA",
) -> TlsFiles:
    """Create a development CA, a server certificate for ``hosts`` and one client certificate per name in ``clients``.

    Keys are ECDSA P-256, written as PEM with mode 0600; certificates carry the extensions strict
    verifiers (Python 3.13's ``VERIFY_X509_STRICT``) ask for. ``hosts`` become subject alternative
    names (IP addresses as IP SANs). Existing files in ``directory`` are overwritten. For
    development and tests only: production certificates come from the operator's own CA.
    Raises ``ConfigError`` for a bad client name.
    """
    tls = TlsFiles(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=_DEV_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(tls.ca_key, ca_key)
    _write_cert(tls.ca_cert, ca_cert)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    _issue(tls, "server", tls.server_cert, tls.server_key, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    for name in clients:
        issue_client_cert(tls, name)
    return tls


def issue_client_cert(tls: TlsFiles, name: str) -> ClientCert:
    """Sign a client certificate with CN = ``name`` (the MQTT username under ``use_identity_as_username``).

    Writes ``clients/<name>.crt`` and ``clients/<name>.key`` (0600) under ``tls.directory``. Raises
    ``ConfigError`` for a name that cannot be an MQTT username, ``FileNotFoundError`` if the CA is missing.
    """
    topics.check_id("MQTT username", name)
    paths = tls.client(name)
    paths.cert.parent.mkdir(parents=True, exist_ok=True)
    _issue(tls, name, paths.cert, paths.key, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return paths


def _issue(
    tls: TlsFiles,
    common_name: str,
    cert_path: Path,
    key_path: Path,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> None:
    ca_key = serialization.load_pem_private_key(tls.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{tls.ca_key} is not an EC private key: recreate the development CA with create_dev_tls")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=_DEV_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    _write_key(key_path, key)
    _write_cert(cert_path, builder.sign(ca_key, hashes.SHA256()))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private(path, pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, mode 0600 from the first byte on (keys, password files).

    Raises ``OSError`` (missing directory, disk full).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is ignored when the temp file already existed
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
