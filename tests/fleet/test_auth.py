"""API tokens: random, shown once, stored as SHA-256, two roles, revocable at once."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from edgeship.errors import AuthError, ConflictError, NotFoundError, UsageError
from edgeship.fleet import auth
from edgeship.fleet.models import ApiToken, Audit
from tests.fleet.fleet_fixtures import FleetUnderTest


def test_tokens_are_stored_hashed_and_authenticate(fleet: FleetUnderTest):
    ctx = fleet.ctx
    _row, secret = auth.create_token(ctx, "ci-bot", "read", actor="token:root")
    assert secret.startswith("esf_") and len(secret) >= 40
    with ctx.db.session(readonly=True) as session:
        stored = session.scalars(select(ApiToken).where(ApiToken.name == "ci-bot")).one()
        hashes = session.scalars(select(ApiToken.token_hash)).all()
    assert stored.token_hash == auth.hash_token(secret) and secret not in hashes
    principal = auth.authenticate(ctx, secret)
    assert (principal.name, principal.role, principal.actor, principal.is_admin) == (
        "ci-bot",
        "read",
        "token:ci-bot",
        False,
    )
    assert auth.authenticate(ctx, fleet.admin_token).is_admin


def test_unknown_missing_and_revoked_tokens_are_refused(fleet: FleetUnderTest):
    ctx = fleet.ctx
    with pytest.raises(AuthError, match="needs a token"):
        auth.authenticate(ctx, None)
    with pytest.raises(AuthError, match="not valid"):
        auth.authenticate(ctx, fleet.admin_token + "x")
    auth.revoke_token(ctx, "viewer", actor="token:root")
    with pytest.raises(AuthError, match="'viewer' was revoked"):
        auth.authenticate(ctx, fleet.read_token)
    auth.revoke_token(ctx, "viewer", actor="token:root")  # twice is fine, audited once
    with ctx.db.session(readonly=True) as session:
        actions = session.scalars(select(Audit.action).where(Audit.subject == "token:viewer")).all()
    assert actions == ["token.create", "token.revoke"]
    with pytest.raises(NotFoundError):
        auth.revoke_token(ctx, "nobody", actor="t")


def test_names_and_roles_are_checked(fleet: FleetUnderTest):
    with pytest.raises(ConflictError, match="a token named 'root' exists"):
        auth.create_token(fleet.ctx, "root", "admin", actor="t")
    with pytest.raises(UsageError, match="role 'owner'"):
        auth.create_token(fleet.ctx, "x", "owner", actor="t")
    with pytest.raises(UsageError, match="token name"):
        auth.create_token(fleet.ctx, "has space", "read", actor="t")


def test_bearer_header_parsing():
    assert auth.bearer("Bearer abc") == "abc"
    assert auth.bearer("bearer  abc ") == "abc"
    assert auth.bearer("Basic abc") is None
    assert auth.bearer("Bearer") is None
    assert auth.bearer(None) is None
