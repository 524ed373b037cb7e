"""The development PKI against Python's own TLS stack: real handshakes over a loopback socket."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import cast

import pytest

from edgeship.errors import ConfigError
from edgeship.fleet.dev_tls import TlsFiles, create_dev_tls, issue_client_cert, write_private

pytestmark = pytest.mark.py310


def _handshake(tls: TlsFiles, client_ca: Path, server_name: str, client: str | None) -> str | None:
    """One mutual-TLS handshake on 127.0.0.1; returns the client certificate's CN seen by the server."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    server_ctx.load_verify_locations(tls.ca_cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(client_ca))
    # What Python 3.13 turns on by default: refuses certificates without the right extensions.
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if client is not None:
        client_ctx.load_cert_chain(tls.client(client).cert, tls.client(client).key)
    seen: list[str | None] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    peer = tls_conn.getpeercert()
                    assert peer is not None
                    rdns = cast("tuple[tuple[tuple[str, str], ...], ...]", peer["subject"])
                    seen.append(dict(attr for rdn in rdns for attr in rdn).get("commonName"))
                    tls_conn.sendall(b"ok")
            except (ssl.SSLError, OSError):
                seen.append(None)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as conn,
        ):
            assert conn.recv(2) == b"ok"
        thread.join(10)
    return seen[0]


def test_server_and_client_certificates_complete_a_strict_mutual_handshake(tmp_path: Path) -> None:
    tls = create_dev_tls(tmp_path, clients=["dev-1"])
    assert _handshake(tls, tls.ca_cert, "127.0.0.1", "dev-1") == "dev-1"
    assert _handshake(tls, tls.ca_cert, "localhost", "dev-1") == "dev-1"
    issue_client_cert(tls, "dev-2")
    assert _handshake(tls, tls.ca_cert, "localhost", "dev-2") == "dev-2"


def test_a_client_trusting_another_ca_refuses_the_server(tmp_path: Path) -> None:
    tls = create_dev_tls(tmp_path / "a", clients=["dev-1"])
    other = create_dev_tls(tmp_path / "b")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls, other.ca_cert, "localhost", "dev-1")


def test_a_host_outside_the_sans_is_refused(tmp_path: Path) -> None:
    tls = create_dev_tls(tmp_path, hosts=["localhost"], clients=["dev-1"])
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        _handshake(tls, tls.ca_cert, "127.0.0.1", "dev-1")


def test_private_files_are_0600_even_when_replacing_a_readable_file(tmp_path: Path) -> None:
    tls = create_dev_tls(tmp_path, clients=["dev-1"])
    for key in (tls.ca_key, tls.server_key, tls.client("dev-1").key):
        assert key.stat().st_mode & 0o777 == 0o600
    secret = tmp_path / "passwd"
    secret.write_text("old")
    secret.chmod(0o644)
    write_private(secret, b"new")
    assert secret.read_bytes() == b"new" and secret.stat().st_mode & 0o777 == 0o600


def test_client_names_must_be_usable_usernames(tmp_path: Path) -> None:
    tls = create_dev_tls(tmp_path)
    with pytest.raises(ConfigError, match="MQTT username"):
        issue_client_cert(tls, "dev/1")
