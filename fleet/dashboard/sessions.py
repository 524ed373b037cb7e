"""Dashboard sessions: a signed cookie that names an API token, and CSRF tokens tied to it.

No session table: the cookie carries ``v1:<token id>:<token hash prefix>:<expiry>:<nonce>`` and an
HMAC-SHA256 of that under a secret kept in the fleet's ``data_dir`` (``dashboard-session.key``,
created on first use, mode 0600). Every request checks the signature and the expiry here, then
looks the token up in ``api_tokens`` (``principal``): a revoked token logs its sessions out at
once, exactly like it stops working on the API. The hash prefix binds the cookie to that one
token, so a cookie cannot outlive its token even if a token id were ever reused.

CSRF: a synchronizer token, ``HMAC(secret, "csrf|" + nonce)``, put in every form of the session
and checked on every POST. The login form, which has no session yet, gets the same from a
short-lived signed pre-login cookie. The cookies are ``HttpOnly`` and ``SameSite=Strict``
(``Secure`` too when the request came over HTTPS), so a page on another site can neither read
them nor make the browser send them.

Logging out deletes the cookie in that browser; a copy taken from it stays valid until it expires
(``SESSION_TTL_S``) unless its token is revoked. That is the price of having no session table.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from edgeship.errors import AuthError
from edgeship.fleet.auth import Principal
from edgeship.fleet.context import FleetContext
from edgeship.fleet.models import ApiToken

SESSION_COOKIE = "edgeship_session"
LOGIN_COOKIE = "edgeship_login"
SESSION_TTL_S = 8 * 3600
"""A session lasts a working day; logging in again is pasting the token again."""
LOGIN_TTL_S = 1800
KEY_FILE = "dashboard-session.key"
_VERSION = "v1"
_HASH_PREFIX = 16


@dataclass(frozen=True)
class Claims:
    """What a verified session cookie says: the token it stands for, when it ends, its nonce."""

    token_id: int
    token_hash_prefix: str
    expires_at: int
    nonce: str


class SessionSigner:
    """Issues and verifies session cookies and CSRF tokens under one secret (pure: no I/O)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the dashboard session secret must be at least 32 bytes")
        self._secret = secret

    def _mac(self, message: str) -> str:
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def issue(self, token_id: int, token_hash: str, now: float, ttl_s: int = SESSION_TTL_S) -> str:
        """A session cookie value for the token ``token_id`` (with hash ``token_hash``), valid ``ttl_s`` seconds."""
        body = f"{_VERSION}:{token_id}:{token_hash[:_HASH_PREFIX]}:{int(now) + ttl_s}:{secrets.token_hex(16)}"
        return f"{body}:{self._mac(body)}"

    def verify(self, value: str | None, now: float) -> Claims | None:
        """The claims of a cookie value, or None when it is missing, malformed, forged or expired."""
        if not value or len(value) > 256:
            return None
        body, _, mac = value.rpartition(":")
        if not hmac.compare_digest(self._mac(body), mac):
            return None
        parts = body.split(":")
        if len(parts) != 5 or parts[0] != _VERSION:
            return None
        _, token_id, prefix, expires, nonce = parts
        if not (token_id.isdigit() and expires.isdigit()):
            return None
        if int(expires) <= now:
            return None
        return Claims(int(token_id), prefix, int(expires), nonce)

    def csrf_token(self, claims: Claims) -> str:
        """The synchronizer token every form of this session carries."""
        return self._mac(f"csrf|{claims.nonce}")

    def check_csrf(self, claims: Claims, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(claims), token or "")

    # The login form: a signed nonce in a short-lived cookie, and its CSRF token in the form.

    def issue_login(self, now: float) -> str:
        body = f"login:{int(now) + LOGIN_TTL_S}:{secrets.token_hex(16)}"
        return f"{body}:{self._mac(body)}"

    def login_csrf(self, login_cookie: str | None, now: float) -> str | None:
        """The CSRF token that goes with a valid pre-login cookie (None when it is not valid)."""
        if not login_cookie or len(login_cookie) > 256:
            return None
        body, _, mac = login_cookie.rpartition(":")
        if not hmac.compare_digest(self._mac(body), mac):
            return None
        parts = body.split(":")
        if len(parts) != 3 or parts[0] != "login" or not parts[1].isdigit() or int(parts[1]) <= now:
            return None
        return self._mac(f"login-csrf|{parts[2]}")


def load_secret(data_dir: Path) -> bytes:
    """The session secret in ``data_dir``, created (32 random bytes, mode 0600) when it does not exist.

    Several fleet processes on one machine share it through ``data_dir``; processes on several
    machines need the same file copied to each (otherwise a session works on one of them only).
    """
    path = data_dir / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        secret = path.read_bytes()
        if len(secret) >= 32:
            return secret
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails when another process created the key first: then everyone uses that one.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()


class SessionEnded(AuthError):
    """A session whose token is gone or revoked; ``code`` (``gone``, ``revoked``) says which."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


ENDED_MESSAGES = {
    "expired": "your session has expired; log in again",
    "revoked": "the token of your session was revoked; log in with another token",
    "gone": "the token of your session no longer exists; log in with another token",
}
"""What the login page says after a session ended, by code (a fixed text: the code travels in the URL)."""


def principal(ctx: FleetContext, claims: Claims) -> Principal:
    """The token a session stands for; raises ``SessionEnded`` when it is gone, revoked, or another token."""
    with ctx.db.session(readonly=True) as session:
        row = session.scalar(select(ApiToken).where(ApiToken.id == claims.token_id))
    if row is None or not hmac.compare_digest(row.token_hash[:_HASH_PREFIX], claims.token_hash_prefix):
        raise SessionEnded(ENDED_MESSAGES["gone"], "gone")
    if row.revoked_at is not None:
        raise SessionEnded(ENDED_MESSAGES["revoked"], "revoked")
    return Principal(row.name, row.role, row.id)


__all__ = [
    "ENDED_MESSAGES",
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "SESSION_TTL_S",
    "Claims",
    "SessionEnded",
    "SessionSigner",
    "load_secret",
    "principal",
]
