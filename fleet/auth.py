"""API tokens: who may read the fleet's state and who may change it.

A token is a random secret (``esf_`` + 43 URL-safe characters, 256 bits) shown once when it is
created; the database keeps only its SHA-256, so a copy of the database does not hand out
access. Roles: ``read`` (every GET) and ``admin`` (everything). A revoked token stops working
at once (every request looks the token up).

The API checks the ``Authorization: Bearer <token>`` header before it reads a request body
(``fleet.api``'s middleware puts the ``Principal`` on the request); ``require_read`` and
``require_admin`` are the FastAPI dependencies that then say 401 or 403.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from edgeship.errors import AuthError, ConflictError, NotFoundError, UsageError
from edgeship.fleet import audit
from edgeship.fleet.context import FleetContext
from edgeship.fleet.models import ApiToken

ROLES = ("read", "admin")
TOKEN_PREFIX = "esf_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def hash_token(secret: str) -> str:
    """The SHA-256 (hex) stored for a token secret."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> str:
    """A fresh random token secret (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: an API token's name and role."""

    name: str
    role: str
    token_id: int

    @property
    def actor(self) -> str:
        """How the audit log names this principal."""
        return f"token:{self.name}"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def check_name(name: str) -> str:
    """Return ``name`` if it can name a token (1-64 letters, digits, ``_ . @ -``); raise ``UsageError`` otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"token name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
    return name


def create_token(ctx: FleetContext, name: str, role: str, *, actor: str) -> tuple[ApiToken, str]:
    """Create an API token; returns the row and the secret (the only time the secret exists in clear).

    Raises ``UsageError`` for a bad name or role, ``ConflictError`` when the name is taken.
    """
    check_name(name)
    if role not in ROLES:
        raise UsageError(f"role {role!r}: use one of {', '.join(ROLES)}")
    secret = new_secret()
    now = ctx.now()
    try:
        with ctx.db.session() as session:
            if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
                raise ConflictError(f"a token named {name!r} exists; choose another name or revoke it first")
            row = ApiToken(name=name, token_hash=hash_token(secret), role=role, created_at=now)
            session.add(row)
            session.flush()
            audit.record(session, actor, "token.create", f"token:{name}", {"role": role}, at=now)
    except IntegrityError:
        raise ConflictError(f"a token named {name!r} exists; choose another name or revoke it first") from None
    return row, secret


def revoke_token(ctx: FleetContext, name: str, *, actor: str) -> ApiToken:
    """Revoke the token called ``name`` (it stops working at once); revoking it twice is not an error.

    Raises ``NotFoundError`` when there is no such token.
    """
    now = ctx.now()
    with ctx.db.session() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == name).with_for_update())
        if row is None:
            raise NotFoundError(f"there is no token named {name!r} (list them with GET /api/v1/tokens)")
        if row.revoked_at is None:
            row.revoked_at = now
            audit.record(session, actor, "token.revoke", f"token:{name}", {}, at=now)
    return row


def list_tokens(ctx: FleetContext) -> list[ApiToken]:
    """Every token, oldest first (revoked ones too)."""
    with ctx.db.session(readonly=True) as session:
        return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def authenticate(ctx: FleetContext, secret: str | None) -> Principal:
    """The principal a token secret stands for; raises ``AuthError`` for a missing, unknown or revoked token.

    The stored hash is looked up by the secret's hash and compared in constant time.
    """
    if not secret:
        raise AuthError("this request needs a token: send 'Authorization: Bearer <token>'")
    wanted = hash_token(secret)
    with ctx.db.session(readonly=True) as session:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == wanted))
    if row is None or not hmac.compare_digest(row.token_hash, wanted):
        raise AuthError("the token is not valid (unknown or mistyped); ask an admin for a token")
    if row.revoked_at is not None:
        raise AuthError(f"the token {row.name!r} was revoked; ask an admin for a new one")
    return Principal(row.name, row.role, row.id)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_to_json(row: ApiToken) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "created_at": row.created_at,
        "revoked_at": row.revoked_at,
    }


# --------------------------------------------------------------------------- FastAPI dependencies


def _principal(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        # The middleware authenticates every /api/ request; reaching here without a principal
        # means a route outside its reach asked for one.
        raise HTTPException(401, "this request needs a token: send 'Authorization: Bearer <token>'")
    return principal


def require_read(request: Request) -> Principal:
    """FastAPI dependency: any valid token (read or admin)."""
    return _principal(request)


def require_admin(request: Request) -> Principal:
    """FastAPI dependency: an admin token; a read token gets 403."""
    principal = _principal(request)
    if not principal.is_admin:
        raise HTTPException(403, f"the token {principal.name!r} is read-only; this needs an admin token")
    return principal


__all__ = [
    "ROLES",
    "Principal",
    "authenticate",
    "bearer",
    "check_name",
    "create_token",
    "hash_token",
    "list_tokens",
    "require_admin",
    "require_read",
    "revoke_token",
    "token_to_json",
]
